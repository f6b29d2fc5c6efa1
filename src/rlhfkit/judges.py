"""Judges: functions that score completions (higher = preferred), used as simulated labelers and metrics.

A judge is ``fn(prompts, completions) -> scores``. Three are built in (``nontoxic``, ``sentiment``,
``clean``); users bring their own as ``module.path:function`` or ``path/to/file.py:function``.
Heavy libraries are imported on first use so that importing rlhfkit stays fast.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.errors import RlhfkitError

JudgeFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class Judge:
    """A named judge; calling it checks the scores so a buggy user judge fails loudly, not silently."""

    name: str
    fn: JudgeFn

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise RlhfkitError(f"judge {self.name!r}: got {len(prompts)} prompts but {len(completions)} completions")
        scores = self.fn(list(prompts), list(completions))
        try:
            n_scores = len(scores)
        except TypeError:
            raise RlhfkitError(
                f"judge {self.name!r} returned {type(scores).__name__}, expected a list of {len(completions)} floats"
            ) from None
        if n_scores != len(completions):
            raise RlhfkitError(f"judge {self.name!r} returned {n_scores} scores for {len(completions)} completions")
        out = []
        for i, score in enumerate(scores):
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise RlhfkitError(
                    f"judge {self.name!r} returned a non-number for completion {i}: {type(score).__name__}"
                ) from None
            if not math.isfinite(value):
                raise RlhfkitError(f"judge {self.name!r} returned {value} for completion {i}; scores must be finite")
            out.append(value)
        return out


@functools.cache
def _predict_prob() -> Callable[[list[str]], Any]:
    """Import alt-profanity-check once: the import itself loads the model (~1.7 s)."""
    from profanity_check import predict_prob

    return predict_prob


def toxicity(completions: list[str]) -> list[float]:
    """P(toxic) per text from alt-profanity-check (lower is better); an empty text is not toxic."""
    probs = [0.0] * len(completions)
    idx = [i for i, text in enumerate(completions) if text.strip()]
    if idx:
        predicted = _predict_prob()([completions[i] for i in idx])
        for i, p in zip(idx, predicted, strict=True):
            probs[i] = float(p)
    return probs


def nontoxic(prompts: list[str], completions: list[str]) -> list[float]:
    """1 - P(toxic): rewards text a classifier trained on human-labelled comments finds inoffensive."""
    return [1.0 - p for p in toxicity(completions)]


@functools.cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER compound score in [-1, 1]: rewards positive, friendly text."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


class _BucketedWordset(list):
    """better-profanity's word list, bucketed by (length, first character) for fast ``in``.

    The library scans all ~900 entries for every word of the text (~2 ms a word); all its character
    substitutions are one character long, so a match must share the length and an allowed first
    character. Same answers, ~100x faster.
    """

    def __init__(self, words: list[Any], char_map: dict[str, tuple[str, ...]]) -> None:
        super().__init__(words)
        self._buckets: dict[tuple[int, str], list[Any]] = {}
        for word in words:
            original = str(word)
            for first in char_map.get(original[0], (original[0],)):
                self._buckets.setdefault((len(original), first), []).append(word)

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str) or not text:
            return False
        return any(word == text for word in self._buckets.get((len(text), text[0]), ()))


@functools.cache
def _profanity() -> Any:
    from better_profanity import Profanity

    profanity = Profanity()
    mapping_is_per_char = all(len(c) == 1 for subs in profanity.CHARS_MAPPING.values() for c in subs)
    if isinstance(profanity.CENSOR_WORDSET, list) and mapping_is_per_char:
        profanity.CENSOR_WORDSET = _BucketedWordset(profanity.CENSOR_WORDSET, profanity.CHARS_MAPPING)
    return profanity


_MARK = "\ue000"  # private-use character: the censor mark, never in real text


def clean(prompts: list[str], completions: list[str]) -> list[float]:
    """1 - fraction of words on better-profanity's word list: rewards text free of swear words."""
    profanity = _profanity()
    scores = []
    for text in completions:
        n_words = len(text.split())
        if n_words == 0:
            scores.append(1.0)
            continue
        censored = profanity.censor(text, _MARK)
        hits = censored.count(_MARK * 4) - text.count(_MARK * 4)
        scores.append(1.0 - min(1.0, hits / n_words))
    return scores


BUILTIN_JUDGES: dict[str, tuple[JudgeFn, str]] = {
    "nontoxic": (nontoxic, "1 - P(toxic) from alt-profanity-check (classifier trained on ~200k comments)"),
    "sentiment": (sentiment, "VADER compound sentiment in [-1, 1] (vaderSentiment)"),
    "clean": (clean, "1 - fraction of words on better-profanity's swear-word list"),
}


def _load_file_module(path: Path) -> Any:
    """Import a .py file by path, registered in sys.modules so dataclasses/pickle inside it work."""
    name = f"rlhfkit_user_judge_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RlhfkitError(f"cannot load judge file {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's file: a SyntaxError or NameError is a problem they fix
        del sys.modules[name]
        raise RlhfkitError(f"cannot import judge file {path}: {type(e).__name__}: {e}") from None
    return module


def load_judge(spec: str) -> Judge:
    """Resolve a built-in name, ``module.path:function`` or ``path/to/file.py:function`` to a Judge."""
    spec = spec.strip()
    if ":" not in spec:
        if spec in BUILTIN_JUDGES:
            return Judge(spec, BUILTIN_JUDGES[spec][0])
        known = ", ".join(BUILTIN_JUDGES)
        raise RlhfkitError(
            f"unknown judge {spec!r}: use one of {known}, or module.path:function, or path/to/file.py:function"
        )
    target, fn_name = spec.rsplit(":", 1)
    if not target or not fn_name:
        raise RlhfkitError(f"bad judge {spec!r}: expected module.path:function or path/to/file.py:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise RlhfkitError(f"judge file not found: {path}")
        module = _load_file_module(path)
        name = f"{path.name}:{fn_name}"
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise RlhfkitError(f"cannot import judge module {target!r}: {type(e).__name__}: {e}") from None
        name = spec
    if not hasattr(module, fn_name):
        raise RlhfkitError(f"judge {spec!r}: module {target!r} has no attribute {fn_name!r}")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RlhfkitError(f"judge {spec!r}: {fn_name!r} is a {type(fn).__name__}, not a function")
    return Judge(name, fn)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams across the texts (diversity; 0 when there are none)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------------------------
# Deflection: completions that replace the content with assistant boilerplate

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'"})
_IM = r"i(?:'?m| am)"  # I'm, Im, I am
_I_CANT = r"(?:i (?:can'?t|cannot|can not|won'?t|will not|am unable to|am not able to)|i'?m (?:unable|not able) to)"
_AI_NOUN = (
    r"(?:(?:helpful|friendly|harmless|honest|virtual|digital|conversational|large) )*"
    r"(?:ai(?: language model| model| assistant| system| chatbot)?|artificial intelligence|language model"
    r"|chatbot|(?:virtual|digital|ai|helpful|friendly) assistant)"
)
_END = (  # what may follow "as an AI": punctuation, a clause, the end; not "researcher", "ethics", ...
    r"(?=\s*[,.;:!?)]|\s*$|\s+(?:and|but|that|which|who|so|not|i|i'm|designed|developed|created|trained|here"
    r"|without|with|like)\b)"
)

DEFLECTION_PATTERNS: dict[str, str] = {
    # Refusals
    "sorry, but I can't": rf"\b(?:sorry|i apologi[sz]e),? but {_I_CANT}",
    "sorry for any confusion": r"\b(?:sorry|apologi[sz]e) for any (?:confusion|misunderstanding)",
    "sorry, I can't help": rf"\b(?:sorry|i apologi[sz]e),? {_I_CANT} (?:help|assist|provide|fulfill|comply|create"
    r"|generate|write|answer|engage|continue|complete|respond to|do that)\b",
    "I can't assist with that": rf"\b{_I_CANT} (?:help|assist)(?: you)? with (?:that|this|your|the|such|requests?)\b",
    "I'm not able to provide": rf"\b{_IM} (?:not able|unable) to "
    r"(?:provide(?! for\b)|fulfill|comply|generate|create)\b",
    "I'm not equipped to": rf"\b{_IM} not equipped to (?:provide|discuss|assist|answer)\b",
    "I can't fulfill that request": rf"\b{_I_CANT} (?:fulfill|comply with|process|complete) "
    r"(?:that|this|your|the) request",
    "I can't provide that content": rf"\b{_I_CANT} (?:provide|generate|create|write|produce) (?:that|this|such|any)? ?"
    r"(?:content|a response|responses|an answer|answers|information|assistance|explicit|offensive|inappropriate"
    r"|harmful)\b",
    "I won't engage in": rf"\b{_I_CANT} (?:engage|participate) in\b",
    # Self-description as an AI
    "as an AI": rf"\bas an? (?:[\w-]+ )?{_AI_NOUN}{_END}",
    "I'm an AI": rf"\b{_IM} (?:just |only |merely |simply |more of |the kind of )?(?:an? (?:[\w-]+ )?)?"
    rf"{_AI_NOUN}{_END}",
    "text-based AI": r"\btext-based (?:ai|assistant|model|language model)\b",
    "I'm designed to": rf"\b(?:{_IM}|i was|i've been|i have been) (?:designed|programmed) to\b",
    "my purpose is to": r"\bmy (?:main |primary |sole |only )?(?:purpose|function) is to\b",
    "I'm trained to assist": rf"\b(?:{_IM}|i was|i've been|i have been) trained to (?:assist|provide assistance)\b",
    "I don't have personal opinions": r"\bi (?:don'?t|do not) have (?:personal (?:opinions|beliefs|feelings|preferences"
    r"|experiences)|the ability to (?:browse|access|feel|form))\b",
    # Offers of help instead of content
    "I'm here to help": rf"\b{_IM} (?:always |just |only )?here to (?:help|assist|answer|support you)\b",
    "I'd be happy to help": r"\bi(?:'?d| would) be (?:more than )?(?:happy|glad|delighted) to (?:help|assist)\b",
    "I'm happy to help": rf"\b{_IM} (?:always )?(?:more than )?(?:happy|glad) to (?:help|assist)\b",
    "How can I help you": r"\bhow (?:can|may|could|might) i (?:(?:help|assist)(?=\s+you\b|\s*[?.!,]|\s*$)"
    r"|be of (?:help|assistance|service))",
    "what can I help you with": r"\bwhat can i (?:help|assist) you with\b",
    "anything else I can help with": r"\b(?:is there )?anything (?:else )?(?:that )?i can (?:help|assist|do for you)",
    "feel free to ask": r"\bfeel free to (?:ask|let me know)\b",
    "if you have any questions, let me know": r"\bif you have any (?:other |more |further |additional )?questions,? "
    r"(?:feel free|please|don'?t hesitate|just ask|let me know|i'?m here)",
}
"""Each boilerplate kind (a readable name) and its regular expression over normalised text."""

_DEFLECTION_RE = [(name, re.compile(pattern)) for name, pattern in DEFLECTION_PATTERNS.items()]


def _normalise(text: str) -> str:
    return " ".join(text.translate(_APOSTROPHES).lower().split())


def deflection_match(text: str) -> tuple[str, str] | None:
    """The first boilerplate found in ``text``: (kind, the matched words), or None.

    See :func:`is_deflection` for what counts.
    """
    norm = _normalise(text)
    for name, pattern in _DEFLECTION_RE:
        found = pattern.search(norm)
        if found:
            return name, found.group(0)
    return None


def is_deflection(text: str) -> bool:
    """True when a completion replaces the content with assistant boilerplate.

    Caught (case-insensitive; curly apostrophes, "Im" and "I am" alike; anywhere in the text):

    - refusals and apologies: "I'm sorry, but I can't ...", "I apologize, but I cannot ...", "I'm
      sorry, but I'm unable to ...", "I can't assist with that", "I'm not able to provide ..." (not
      "provide for"), "I'm not equipped to discuss", "I cannot fulfill that request", "I can't
      provide that content / information / a response", "I won't engage in ...", "sorry for any
      confusion / misunderstanding";
    - self-description as an AI: "As an AI (language model)", "as a helpful assistant", "as a
      blog-writing AI" (one free word before "AI"), "I'm a helpful AI assistant", "I'm just a
      language model", "I'm more of a helpful AI", "as a text-based AI", "I'm designed /
      programmed to", "I'm trained to assist", "my purpose / primary function is to", "I don't have
      personal opinions";
    - offers of help in place of content: "I'm here to help / assist / support you", "I'd be happy
      to help", "I'm (more than) glad to assist", "How can I help/assist you", "How may I be of
      assistance", "What can I help you with", "Is there anything else I can help with", "feel free
      to ask", "If you have any other questions, let me know".

    "AI" counts only as a self-description: followed by punctuation, the end, or a clause ("as an
    AI, I ...", "an AI designed to"), so "as an AI researcher" and "a big AI fan" pass.

    Not caught, on purpose: the words "help", "assist", "AI" or "sorry" on their own ("the man said
    he would help his neighbour", "an AI researcher", "I'm an assistant manager", "I'm sorry I
    missed your call"), "How could I help it", "I'm not able to provide for my family", "I'm not
    equipped to handle this", "We apologize for any inconvenience", "I'm using AI". Also not
    caught: moralising without a refusal ("It's important to remember ..."), refusals in other
    languages or worded in ways the list does not name. A story that quotes one of the phrases
    counts as a deflection: the detector reads words, not intent.
    """
    return deflection_match(text) is not None


def deflection_rate(texts: Sequence[str]) -> float:
    """Share of texts that :func:`is_deflection` flags (0 when there are none)."""
    return sum(is_deflection(t) for t in texts) / len(texts) if texts else 0.0

"""ScienceQA answer parsing, exactly as LLaVA's `llava/eval/eval_science_qa.py` does it.

The official rule, applied to the model's output (which LLaVA strips before saving it):

1. the output is exactly one of the option letters (`A`..`E`) -> that letter;
2. else it is at least 3 characters long, starts with an option letter followed by `". "` -> that letter
   (so `"B. mushroom"` is `B`);
3. else the regular expression `The answer is ([A-Z]).` matches exactly once -> that letter (the `.` is the regex
   wildcard, as in the original, and the letter may lie outside the options: it is then simply wrong);
4. else `"FAILED"`, which is counted as wrong.

Matching the output string against the label (the research script's approach) scores `"B. mushroom"` wrong.
"""

from __future__ import annotations

import re

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_answer(text: str, options: tuple[str, ...] = OPTIONS) -> str:
    """The letter the official parser reads from a model output, or `FAILED`.

    `text` is stripped first (LLaVA's `model_vqa_science.py` saves `outputs.strip()`, which the parser reads).
    """
    text = text.strip()
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    matches = _ANSWER_IS.findall(text)
    if len(matches) == 1:
        return matches[0]
    return FAILED


def is_correct(prediction: str, label: str) -> bool:
    """Whether a parsed prediction equals the label letter (`FAILED` never does)."""
    return prediction != FAILED and prediction == label


def label_from_text(text: str, options: tuple[str, ...] = OPTIONS) -> str | None:
    """The label letter of a ground-truth answer (`"B"`, `"B. mushroom"`, `"The answer is B."`), else None."""
    letter = parse_answer(text, options)
    return None if letter == FAILED or letter not in options else letter

"""The answer parser against the rules of LLaVA's `llava/eval/eval_science_qa.py`."""

import pytest

from fastv_advanced.answers import FAILED, is_correct, label_from_text, parse_answer

# (model output, what the official parser reads), following its three rules in order.
OFFICIAL_CASES = [
    # 1. exactly an option letter
    ("A", "A"),
    ("E", "E"),
    ("  C\n", "C"),  # model_vqa_science saves outputs.strip()
    # 2. at least 3 characters, an option letter then ". "
    ("B. mushroom", "B"),
    ("D. x", "D"),
    ("D. ", FAILED),  # stripped to "D." first, as LLaVA saves it
    ("A. The answer is B.", "A"),  # rule 2 wins over rule 3
    # 3. exactly one "The answer is X." (regex wildcard after the letter)
    ("The answer is C.", "C"),
    ("Answer: The answer is B.", "B"),
    ("Because of the colour, The answer is D.\n", "D"),
    ("The answer is A!", "A"),  # `.` in the pattern is the regex wildcard
    ("The answer is F.", "F"),  # a letter outside the options is read, then simply wrong
    # 4. FAILED
    ("The answer is A. No wait, The answer is B.", FAILED),  # two matches
    ("The answer is B", FAILED),  # nothing after the letter
    ("b", FAILED),
    ("A.", FAILED),  # shorter than 3 characters
    ("A) circle", FAILED),
    ("F", FAILED),  # not an option letter
    ("F. fish", FAILED),
    ("(B) square", FAILED),
    ("", FAILED),
    ("I think it is B", FAILED),
    ("the answer is b.", FAILED),  # case-sensitive
]


@pytest.mark.parametrize("text,expected", OFFICIAL_CASES)
def test_parser_follows_the_official_rules(text, expected):
    assert parse_answer(text) == expected


def test_failed_and_wrong_letters_are_never_correct():
    assert is_correct("B", "B")
    assert not is_correct("A", "B")
    assert not is_correct(FAILED, "B")
    assert not is_correct(parse_answer("mushroom"), "B")


def test_exact_string_matching_bug_is_not_repeated():
    """The research script compared the raw output to the label: "B. mushroom" != "B" scored wrong."""
    assert is_correct(parse_answer("B. mushroom"), "B")


def test_labels_from_question_files():
    assert label_from_text("B") == "B"
    assert label_from_text("The answer is C.") == "C"
    assert label_from_text("mushroom") is None
    assert label_from_text("F") is None

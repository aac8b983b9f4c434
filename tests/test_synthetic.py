"""The synthetic ScienceQA-style generator: determinism, the LLaVA question-file format, the shipped test split."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastv_advanced import synthetic, tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data" / "scienceqa"
OPTION_LINE = re.compile(r"^([A-E])\. (.+)$")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    for run in ("a", "b"):
        questions = synthetic.generate_split(seed=7, num_questions=12, id_start=1)
        synthetic.write_split(questions, tmp_path / run / "q.json", tmp_path / run / "images")
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 13  # the question file and 12 images
    assert first == second

    other = synthetic.generate_split(seed=8, num_questions=12, id_start=1)
    synthetic.write_split(other, tmp_path / "c" / "q.json", tmp_path / "c" / "images")
    third = _files(tmp_path / "c")
    assert third["q.json"] != first["q.json"]
    assert sum(third[name] != first[name] for name in first if name.endswith(".png")) >= 10


def test_a_question_can_be_regenerated_on_its_own():
    split = synthetic.generate_split(seed=3, num_questions=40, id_start=5)
    again = synthetic.generate_split(seed=3, num_questions=40, id_start=5)
    assert [q.entry for q in split] == [q.entry for q in again]
    assert np.array_equal(np.asarray(split[17].render()), np.asarray(again[17].render()))


def test_entries_have_the_llava_question_file_format():
    questions = synthetic.generate_split(seed=11, num_questions=200, id_start=1)
    entries = json.loads(synthetic.questions_json(questions))
    assert [e["id"] for e in entries] == [str(i) for i in range(1, 201)]
    for entry, question in zip(entries, questions):
        assert set(entry) == {"id", "image", "conversations"}
        assert entry["image"] == f"{entry['id']}/image.png"
        human, gpt = entry["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        lines = human["value"].split("\n")
        assert lines[0] == "<image>"
        body = lines[1:]
        if body[0].startswith("Context: "):
            body = body[1:]
        assert body[0].endswith("?")
        options = [OPTION_LINE.match(line) for line in body[1:]]
        assert all(options), human["value"]
        assert [m.group(1) for m in options] == list("ABCDE"[: len(options)])
        assert 2 <= len(options) <= 5
        assert gpt["value"] in [m.group(1) for m in options]
        assert tuple(m.group(2) for m in options) == question.options
    assert 0.3 < sum("Context: " in e["conversations"][0]["value"] for e in entries) / len(entries) < 0.7


def test_the_answer_is_the_attribute_of_the_object_in_the_asked_cell():
    recipe = synthetic.DEFAULT_RECIPE
    for question in synthetic.generate_split(seed=5, num_questions=200, id_start=1):
        text = question.entry["conversations"][0]["value"]
        target = [obj for obj in question.objects if obj.cell == question.cell]
        assert len(target) == 1
        assert f"in the {recipe.positions[question.cell]}?" in text
        answer = question.options["ABCDE".index(question.answer)]
        attribute = "colour" if question.question_type == "colour" else "shape"
        assert getattr(target[0], attribute) == answer


def test_the_picture_holds_other_options_so_the_cell_must_be_looked_at():
    """With several objects (Recipe()'s defaults), most questions show a wrong option elsewhere in the picture."""
    questions = synthetic.generate_split(seed=5, num_questions=300, id_start=1, recipe=synthetic.Recipe())
    confusable = 0
    for question in questions:
        attribute = "colour" if question.question_type == "colour" else "shape"
        answer = question.options["ABCDE".index(question.answer)]
        wrong = set(question.options) - {answer}
        confusable += any(getattr(o, attribute) in wrong for o in question.objects if o.cell != question.cell)
    assert confusable / len(questions) > 0.6


def test_answer_letters_are_balanced_within_each_option_count():
    questions = synthetic.generate_split(seed=2, num_questions=600, id_start=1)
    by_count: dict[int, Counter] = {}
    for question in questions:
        by_count.setdefault(question.num_options, Counter())[question.answer] += 1
    for count, letters in by_count.items():
        assert set(letters) == set("ABCDE"[:count])
        assert max(letters.values()) - min(letters.values()) <= 1, (count, letters)


@pytest.mark.parametrize("order", ["fixed", "sorted", "shuffled"])
def test_every_option_order_puts_the_answer_on_the_planned_letter(order):
    recipe = synthetic.Recipe(option_order=order, question_types=(("colour", 0.4), ("shape", 0.4), ("yes_no", 0.2)))
    questions = synthetic.generate_split(seed=9, num_questions=150, id_start=1, recipe=recipe)
    plan = synthetic._plan(9, 150, recipe)
    for question, (kind, count, letter) in zip(questions, plan):
        assert question.question_type == kind and question.num_options == count
        assert question.answer == "ABCDE"[letter]
        if order == "sorted" and kind != "yes_no":
            canonical = tuple(synthetic.COLOURS) if kind == "colour" else synthetic.SHAPES
            assert list(question.options) == sorted(question.options, key=canonical.index)


def test_images_are_336_pixel_rgb_with_the_objects_drawn():
    question = synthetic.generate_split(seed=1, num_questions=1, id_start=1)[0]
    image = question.render()
    assert image.mode == "RGB" and image.size == (336, 336)
    pixels = np.asarray(image)
    for obj in question.objects:
        assert tuple(pixels[obj.cy, obj.cx]) == synthetic.COLOURS[obj.colour]


def test_shipped_test_split_is_what_the_generator_makes_from_its_recorded_seed():
    record = json.loads((DATA / "generation.json").read_text())
    assert record["generator_version"] == synthetic.GENERATOR_VERSION
    test = record["test"]
    questions = synthetic.generate_split(test["seed"], test["num_questions"], test["id_start"])
    shipped = (DATA / test["question_file"]).read_text(encoding="utf-8")
    assert shipped == synthetic.questions_json(questions)
    images = DATA / test["image_folder"]
    assert len(list(images.glob("*/image.png"))) == test["num_questions"]
    for question in questions[:: max(1, len(questions) // 25)]:  # a slice of 25 images, compared pixel by pixel
        with Image.open(images / question.entry["image"]) as shipped_image:
            assert np.array_equal(np.asarray(shipped_image.convert("RGB")), np.asarray(question.render()))


def test_shipped_data_stays_small():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 3 * 1024 * 1024


def test_tokenizer_corpus_is_optional_and_keeps_words_whole():
    assert tiny.build_tokenizer().get_vocab() == tiny.build_tokenizer(corpus=None).get_vocab()
    questions = synthetic.generate_split(seed=1, num_questions=300, id_start=1, recipe=synthetic.Recipe())
    tokenizer = tiny.build_tokenizer(640, corpus=synthetic.corpus(questions))
    for word in ["red", "green", "top", "colour"]:  # words every split uses
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    for letter in "ABCDE":  # the answer after "ASSISTANT:" is one token, like Llama's "▁B"
        assert len(tokenizer(letter, add_special_tokens=False).input_ids) == 1

"""ScienceQA data: LLaVA question files, the official release's conversion, validation and image errors."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import draw_image, llava_entry
from fastv_advanced.scienceqa import (
    DataError,
    SampleError,
    load_image,
    load_questions,
    main as convert_main,
    missing_images,
    split_chunks,
)

OFFICIAL = Path(__file__).parent / "data" / "scienceqa_official"


def test_llava_question_file(question_set):
    question_file, images = question_set
    questions = load_questions(question_file)
    assert questions.format == "llava" and len(questions) == 6 and questions.num_in_file == 6
    first = questions.questions[0]
    assert first.id == "10" and first.label == "A" and first.image == "10/image.png" and first.error is None
    assert first.text.startswith("<image>\nWhich shape is red?\nA. circle\nB. square")
    assert questions.questions[-1].image is None  # text-only question
    assert len(questions.sha256) == 64
    assert questions.head(2).questions == questions.questions[:2]
    assert load_image(images, first).mode == "RGB"
    assert load_image(images, questions.questions[-1]) is None


def test_official_release_is_converted_to_llava_prompts():
    questions = load_questions(OFFICIAL)  # the folder; split defaults to test
    assert questions.format == "official" and questions.split == "test"
    assert [q.id for q in questions.questions] == ["1", "2", "3", "4"]
    by_id = {q.id: q for q in questions.questions}
    # Context line only with a non-empty hint; options as "A. ..."; label from the answer index.
    assert by_id["1"].text == "<image>\nContext: Look at the picture.\nWhich shape is red?\nA. circle\nB. square"
    assert by_id["1"].label == "B" and by_id["1"].image == "1/image.png"
    assert by_id["2"].text == "<image>\nWhich colour is the large shape?\nA. red\nB. green\nC. blue"
    assert by_id["2"].label == "C"
    assert by_id["3"].text.endswith("\nE. five") and by_id["3"].label == "A"
    assert by_id["4"].image is None and by_id["4"].text.startswith("Context: Words can name")
    assert load_questions(OFFICIAL / "problems.json", split="val").questions[0].id == "5"
    assert [q.id for q in load_questions(OFFICIAL, split="minitest").questions] == ["1", "4"]


def test_official_conversion_command(tmp_path, capsys):
    out = tmp_path / "llava_test.json"
    assert convert_main([str(OFFICIAL), "--split", "test", "--images-only", "-o", str(out)]) == 0
    entries = json.loads(out.read_text())
    assert [e["id"] for e in entries] == ["1", "2", "3"]
    assert entries[0]["conversations"][1] == {"from": "gpt", "value": "B"}
    # The written file reads back to the same questions.
    again = load_questions(out)
    official = {q.id: q for q in load_questions(OFFICIAL).questions}
    assert all(q.text == official[q.id].text and q.label == official[q.id].label for q in again.questions)


def test_unknown_split_lists_the_available_ones():
    with pytest.raises(DataError, match=r"--split 'tests' is not in .*pid_splits.json; available: .*minitest.*test"):
        load_questions(OFFICIAL, split="tests")


def test_split_flag_is_refused_for_llava_files(question_set):
    with pytest.raises(DataError, match="--split 'test' applies to the official release"):
        load_questions(question_set[0], split="test")


def test_official_release_without_pid_splits(tmp_path):
    shutil.copy(OFFICIAL / "problems.json", tmp_path / "problems.json")
    with pytest.raises(DataError, match=r"pid_splits.json.*does not exist"):
        load_questions(tmp_path)


def test_malformed_official_problem_names_file_problem_and_field(tmp_path):
    problems = json.loads((OFFICIAL / "problems.json").read_text())
    problems["2"]["answer"] = 7
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    shutil.copy(OFFICIAL / "pid_splits.json", tmp_path / "pid_splits.json")
    bad = {q.id: q for q in load_questions(tmp_path).questions}["2"]
    assert "problems.json: problem '2'" in bad.error and "field 'answer' = 7" in bad.error


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "question file .*missing.json does not exist"),
        ("{not json", "is not valid JSON"),
        ('{"a": 1}', "expected a JSON list of entries"),
        ('[{"id": "1", "conversations": []}, {"id": "1", "conversations": []}]', "id '1' appears twice"),
    ],
)
def test_bad_question_files(tmp_path, content, message):
    path = tmp_path / ("missing.json" if content is None else "questions.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_questions(path)


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda e: e.pop("conversations"), "field 'conversations'"),
        (lambda e: e["conversations"].pop(), "field 'conversations[1]'"),
        (lambda e: e["conversations"][1].update(value="mushroom"), "field 'conversations[1].value' = 'mushroom'"),
        (lambda e: e["conversations"][0].update(value=3), "field 'conversations[0]'"),
        (lambda e: e.update(image=""), "field 'image'"),
        (lambda e: e.pop("id"), "field 'id'"),
    ],
)
def test_malformed_entry_names_file_entry_and_field(tmp_path, mutate, field):
    good = llava_entry("7", "Which?", ["x", "y"], "A", None)
    bad = llava_entry("8", "Which?", ["x", "y"], "B", "8/image.png")
    mutate(bad)
    path = tmp_path / "questions.json"
    path.write_text(json.dumps([good, bad]))
    questions = load_questions(path)  # the file loads; the bad entry carries its error
    assert questions.questions[0].error is None
    error = questions.questions[1].error
    assert str(path) in error and "entry 1" in error and field in error


def test_missing_and_corrupt_images_name_the_file(question_set):
    question_file, images = question_set
    questions = load_questions(question_file).questions
    (images / "10" / "image.png").unlink()
    (images / "11" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    assert missing_images(questions, images) == [f"image {images / '10' / 'image.png'} of question '10' does not exist"]
    with pytest.raises(SampleError, match=r"10/image.png of question '10' does not exist"):
        load_image(images, questions[0])
    with pytest.raises(SampleError, match=r"11/image.png of question '11' cannot be read"):
        load_image(images, questions[1])
    # A truncated file (valid header, data cut off) is caught too: images are fully decoded on load.
    draw_image(images / "12" / "image.png", 3, size=(200, 200))
    data = (images / "12" / "image.png").read_bytes()
    (images / "12" / "image.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match="cannot be read"):
        load_image(images, questions[2])


def test_chunks_are_contiguous_and_cover_everything():
    items = list(range(10))
    chunks = split_chunks(items, 3)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_chunks([1], 3) == [[1], [], []]

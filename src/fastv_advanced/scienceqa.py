"""ScienceQA data: LLaVA question files, the official release, validation and image loading.

Two formats are read into the same `Question` records:

- **LLaVA question file** (e.g. `llava_test_CQM-A.json`, `himap-inference-MCQ.json`): a JSON list of
  `{"id": "5", "image": "5/image.png", "conversations": [{"from": "human", "value": "<image>\\nContext: ...\\n
  Which ...?\\nA. ...\\nB. ..."}, {"from": "gpt", "value": "B"}]}`; images at `<image-folder>/<image>`. Entries
  without `image` are text-only questions.
- **Official release** (`problems.json` + `pid_splits.json` of the ScienceQA project): each problem of the chosen
  split becomes the same prompt, `Context: {hint}\\n` (only when the hint is non-empty), the question, then the
  options as `A. ...` lines; the label is the letter of `answer`, the image `<pid>/image.png` (the release keeps
  them under `images/<split>/<pid>/image.png`).

A third source, ScienceQA from HF datasets (`lmms-lab/ScienceQA`, `derek-thomas/ScienceQA`), is read by
`fastv_advanced.hf_datasets` into the same records, each row through `parse_official_problem`, so that its prompts
are the official release's.

Errors name the file, the entry id and the field. File-level problems (missing file, not JSON, wrong top-level
type, duplicate ids, unknown split) raise `DataError`; a malformed entry does not stop the load: the `Question`
carries an `error` message and the evaluation records it as a failed sample (or stops, with `--on-error fail`).

`python -m fastv_advanced.scienceqa PROBLEMS --split test [--images-only] -o questions.json` writes an official
split as a LLaVA question file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .answers import OPTIONS, label_from_text

PROBLEMS_FILE = "problems.json"
PID_SPLITS_FILE = "pid_splits.json"
DEFAULT_OFFICIAL_SPLIT = "test"


class DataError(ValueError):
    """A question file (or official release) that cannot be used at all."""


class SampleError(ValueError):
    """One question that cannot be evaluated (malformed entry, missing or unreadable image)."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question.

    id: the entry id (a string, as LLaVA writes it). text: the question as given to the model, options included,
    with or without the leading `<image>` line. label: the answer letter (None when the entry is malformed).
    image: the image path relative to the image folder, None for text-only questions. error: why the entry cannot
    be evaluated (names file, entry and field), None when it is fine.
    """

    id: str
    text: str
    label: str | None
    image: str | None
    index: int
    error: str | None = None


@dataclass(frozen=True)
class QuestionSet:
    """The questions of one file, in file order, and the file's identity (for result files and resume)."""

    path: str
    format: str  # "llava", "official" or "hf"
    sha256: str
    split: str | None
    questions: list[Question] = field(default_factory=list)
    num_in_file: int = 0
    config: str | None = None  # the HF dataset's configuration (format "hf" only)

    def __len__(self) -> int:
        return len(self.questions)

    def head(self, num_samples: int | None) -> "QuestionSet":
        """The first `num_samples` questions (all when None)."""
        if num_samples is None:
            return self
        return replace(self, questions=self.questions[:num_samples])

    def chunk(self, num_chunks: int, chunk_idx: int) -> "QuestionSet":
        """Contiguous chunk `chunk_idx` of `num_chunks`, split like LLaVA's `get_chunk` (ceil-sized chunks)."""
        return replace(self, questions=split_chunks(self.questions, num_chunks)[chunk_idx])

    @property
    def malformed(self) -> list[Question]:
        return [q for q in self.questions if q.error is not None]

    def identity(self) -> dict:
        """What identifies the question set in result files: path, format, split, content hash, size (and, for an
        HF dataset, its configuration)."""
        identity = {
            "path": self.path,
            "format": self.format,
            "split": self.split,
            "sha256": self.sha256,
            "num_questions_in_file": self.num_in_file,
        }
        if self.format == "hf":
            identity["config"] = self.config
        return identity


def split_chunks(items: list, num_chunks: int) -> list[list]:
    """`num_chunks` contiguous chunks of ceil(len / num_chunks) items (the last ones may be short or empty)."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks} must be >= 1")
    size = -(-len(items) // num_chunks) if items else 0
    return [items[i * size : (i + 1) * size] for i in range(num_chunks)]


def file_sha256(path: str | os.PathLike, extra: bytes = b"") -> str:
    """SHA-256 of a file's bytes (followed by `extra`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(extra)
    return digest.hexdigest()


def _read_json(path: Path, what: str):
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if path.is_dir():
        raise DataError(f"{what} {path} is a directory, expected a JSON file")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} {path} is not valid JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} cannot be read: {exc}") from exc


# -- LLaVA question files --------------------------------------------------------------------------------------------


def parse_llava_entry(entry, index: int, source: str) -> Question:
    """One entry of a LLaVA question file as a `Question` (with `error` set when it is malformed)."""
    raw_id = entry.get("id") if isinstance(entry, dict) else None
    qid = str(raw_id) if isinstance(raw_id, (str, int)) and str(raw_id) != "" else f"#{index}"
    where = f"{source}: entry {index} (id {qid!r})"

    def bad(message: str) -> Question:
        return Question(id=qid, text="", label=None, image=None, index=index, error=f"{where}: {message}")

    if not isinstance(entry, dict):
        return bad(f"expected an object with 'id' and 'conversations', got {type(entry).__name__}")
    if qid.startswith("#"):
        return bad("field 'id' is missing or not a string/integer")
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return bad("field 'conversations' is missing or not a non-empty list")
    human = conversations[0]
    if not isinstance(human, dict) or human.get("from") != "human" or not isinstance(human.get("value"), str):
        return bad("field 'conversations[0]' must be {'from': 'human', 'value': <question text>}")
    if not human["value"].strip():
        return bad("field 'conversations[0].value' is empty")
    if len(conversations) < 2 or not isinstance(conversations[1], dict) or not isinstance(
        conversations[1].get("value"), str
    ):
        return bad("field 'conversations[1]' must be {'from': 'gpt', 'value': <answer letter>} (the label)")
    label = label_from_text(conversations[1]["value"])
    if label is None:
        return bad(
            f"field 'conversations[1].value' = {conversations[1]['value']!r} is not an answer letter "
            f"({', '.join(OPTIONS)}) nor 'The answer is X.'"
        )
    image = entry.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        return bad(f"field 'image' = {image!r} must be a relative image path or absent")
    return Question(id=qid, text=human["value"], label=label, image=image, index=index)


def _check_duplicates(questions: list[Question], source: str) -> None:
    seen: dict[str, int] = {}
    for question in questions:
        if question.id.startswith("#"):
            continue
        if question.id in seen:
            raise DataError(
                f"{source}: id {question.id!r} appears twice (entries {seen[question.id]} and {question.index}); "
                "ids must be unique (results are resumed by id)"
            )
        seen[question.id] = question.index


def load_llava_questions(path: str | os.PathLike) -> QuestionSet:
    """Read a LLaVA question file (JSON list of conversation entries)."""
    path = Path(path)
    data = _read_json(path, "question file")
    if not isinstance(data, list):
        raise DataError(
            f"question file {path}: expected a JSON list of entries (LLaVA format), got {type(data).__name__}"
        )
    questions = [parse_llava_entry(entry, index, str(path)) for index, entry in enumerate(data)]
    _check_duplicates(questions, str(path))
    return QuestionSet(str(path.resolve()), "llava", file_sha256(path), None, questions, len(questions))


# -- the official release --------------------------------------------------------------------------------------------


def official_question_text(problem: dict) -> str:
    """The LLaVA prompt text of an official problem: optional Context line, the question, `A. ...` options."""
    hint = (problem.get("hint") or "").strip()
    lines = [f"Context: {hint}"] if hint else []
    lines.append(problem["question"].strip())
    lines += [f"{OPTIONS[i]}. {choice}" for i, choice in enumerate(problem["choices"])]
    return "\n".join(lines)


def parse_official_problem(pid: str, problem, index: int, source: str, where: str | None = None) -> Question:
    """One official problem as a `Question` (with `error` set when a field is malformed); `where` replaces the
    `<source>: problem <pid>` that starts the error messages."""
    where = where or f"{source}: problem {pid!r}"

    def bad(message: str) -> Question:
        return Question(id=pid, text="", label=None, image=None, index=index, error=f"{where}: {message}")

    if not isinstance(problem, dict):
        return bad(f"expected an object, got {type(problem).__name__}")
    if not isinstance(problem.get("question"), str) or not problem["question"].strip():
        return bad("field 'question' is missing or empty")
    choices = problem.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(OPTIONS) or not all(
        isinstance(c, str) for c in choices
    ):
        return bad(f"field 'choices' must be a list of 2 to {len(OPTIONS)} strings, got {choices!r}")
    answer = problem.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return bad(f"field 'answer' = {answer!r} must be an index into the {len(choices)} choices")
    hint = problem.get("hint")
    if hint is not None and not isinstance(hint, str):
        return bad(f"field 'hint' = {hint!r} must be a string or null")
    image = problem.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        return bad(f"field 'image' = {image!r} must be a file name (e.g. 'image.png') or null")
    text = official_question_text(problem)
    if image:
        text = "<image>\n" + text
    return Question(
        id=pid, text=text, label=OPTIONS[answer], image=f"{pid}/{image}" if image else None, index=index
    )


def _official_paths(path: Path) -> tuple[Path, Path]:
    problems = path / PROBLEMS_FILE if path.is_dir() else path
    return problems, problems.parent / PID_SPLITS_FILE


def load_official_questions(path: str | os.PathLike, split: str = DEFAULT_OFFICIAL_SPLIT) -> QuestionSet:
    """The questions of `split` from an official release (`problems.json` or its folder; `pid_splits.json`
    beside it), in the order of `pid_splits.json`."""
    problems_path, splits_path = _official_paths(Path(path))
    problems = _read_json(problems_path, "ScienceQA problems file")
    if not isinstance(problems, dict):
        raise DataError(f"ScienceQA problems file {problems_path}: expected an object {{pid: problem}}")
    splits = _read_json(splits_path, "ScienceQA split file (needed beside problems.json)")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DataError(f"ScienceQA split file {splits_path}: expected an object {{split: [pid, ...]}}")
    if split not in splits:
        raise DataError(f"--split {split!r} is not in {splits_path}; available: {', '.join(sorted(splits))}")
    questions = []
    for index, pid in enumerate(splits[split]):
        pid = str(pid)
        if pid not in problems:
            questions.append(
                Question(pid, "", None, None, index, f"{splits_path}: split {split!r} lists pid {pid!r}, which "
                                                     f"{problems_path} does not contain")
            )
        else:
            questions.append(parse_official_problem(pid, problems[pid], index, str(problems_path)))
    _check_duplicates(questions, f"{splits_path} (split {split!r})")
    digest = file_sha256(problems_path, extra=split.encode() + bytes.fromhex(file_sha256(splits_path)))
    return QuestionSet(str(problems_path.resolve()), "official", digest, split, questions, len(questions))


def is_official_release(path: str | os.PathLike) -> bool:
    """True for a folder holding `problems.json`, or a file named `problems.json`."""
    path = Path(path)
    return (path.is_dir() and (path / PROBLEMS_FILE).is_file()) or path.name == PROBLEMS_FILE


def load_questions(path: str | os.PathLike, split: str | None = None) -> QuestionSet:
    """A LLaVA question file, or an official release (folder or `problems.json`) with `split` (default test)."""
    if path is None:
        raise DataError("no question file given (--question-file)")
    path = Path(path)
    if is_official_release(path):
        return load_official_questions(path, split or DEFAULT_OFFICIAL_SPLIT)
    if path.is_dir():
        raise DataError(f"question file {path} is a directory without {PROBLEMS_FILE}")
    if split is not None:
        raise DataError(
            f"--split {split!r} applies to the official release (problems.json + pid_splits.json); "
            f"{path} is a LLaVA question file, which is one split already"
        )
    return load_llava_questions(path)


def to_llava_entries(questions: QuestionSet, images_only: bool = False) -> list[dict]:
    """The questions as LLaVA question-file entries (malformed ones raise `DataError`)."""
    entries = []
    for question in questions.questions:
        if question.error:
            raise DataError(question.error)
        if images_only and question.image is None:
            continue
        entry = {"id": question.id}
        if question.image is not None:
            entry["image"] = question.image
        entry["conversations"] = [
            {"from": "human", "value": question.text},
            {"from": "gpt", "value": question.label},
        ]
        entries.append(entry)
    return entries


# -- images ---------------------------------------------------------------------------------------------------------


def image_path(image_folder: str | os.PathLike | None, question: Question) -> Path | None:
    """Where the question's image lives (None for text-only questions)."""
    if question.image is None:
        return None
    if image_folder is None:
        raise SampleError(f"question {question.id!r} has image {question.image!r} but no --image-folder was given")
    return Path(image_folder) / question.image


def missing_images(questions: list[Question], image_folder: str | os.PathLike | None) -> list[str]:
    """One message per well-formed question whose image file is absent."""
    problems = []
    for question in questions:
        if question.error is None and question.image is not None:
            path = image_path(image_folder, question)
            if not path.is_file():
                problems.append(f"image {path} of question {question.id!r} does not exist")
    return problems


def load_image(image_folder: str | os.PathLike | None, question: Question) -> Image.Image | None:
    """The question's image as RGB (fully decoded), None for text-only; `SampleError` naming the file otherwise."""
    path = image_path(image_folder, question)
    if path is None:
        return None
    if not path.is_file():
        raise SampleError(f"image {path} of question {question.id!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SampleError(f"image {path} of question {question.id!r} cannot be read: {exc}") from exc


# -- conversion command ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m fastv_advanced.scienceqa`: write an official split as a LLaVA question file."""
    parser = argparse.ArgumentParser(
        prog="python -m fastv_advanced.scienceqa",
        description="Convert the official ScienceQA release (problems.json + pid_splits.json) to a LLaVA question "
        "file with the prompts the evaluation uses.",
    )
    parser.add_argument("problems", help="problems.json, or the folder holding it and pid_splits.json")
    parser.add_argument("--split", default=DEFAULT_OFFICIAL_SPLIT, help="split of pid_splits.json (default: test)")
    parser.add_argument("--images-only", action="store_true", help="keep only questions with an image "
                        "(the test split gives the 2017 questions of ScienceQA-IMG)")
    parser.add_argument("-o", "--output", required=True, help="the LLaVA question file to write (JSON)")
    args = parser.parse_args(argv)
    try:
        entries = to_llava_entries(load_official_questions(args.problems, args.split), args.images_only)
    except DataError as exc:
        parser.exit(2, f"error: {exc}\n")
    tmp = f"{args.output}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=1, ensure_ascii=False)
    os.replace(tmp, args.output)
    print(f"wrote {len(entries)} questions of split {args.split!r} to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

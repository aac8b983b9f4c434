"""ScienceQA from HF datasets: `lmms-lab/ScienceQA` and `derek-thomas/ScienceQA`, from the local cache or local
parquet files, read into the same `Question` records as the official release, with the same prompts.

The schema implemented is the one both datasets publish in their dataset cards (one row per problem, no id column):

    image     Image (parquet: struct<bytes: binary, path: string>; null for a text-only problem)
    question  string
    choices   sequence of string (2 to 5 options)
    answer    int8 (index into choices)
    hint      string (the context; "" when there is none)
    task, grade, subject, topic, category, skill, lecture, solution   string (not used for the prompt)

`lmms-lab/ScienceQA` has the configurations `ScienceQA-IMG` (problems with an image: 2,017 in test, 2,097 in
validation) and `ScienceQA-FULL` (all 4,241 test/validation problems); `derek-thomas/ScienceQA` has one configuration
with the splits train/validation/test (12,726/4,241/4,241) and null images for text-only problems. Both are the
official release (`problems.json`) in its split order, without the pids.

- **Columns.** `question`, `choices`, `answer`, `hint` and `image` are required (they make the prompt and the
  image); a dataset without one of them raises `DataError` naming the missing columns, the columns present and the
  file. Other columns are ignored.
- **Prompts.** Each row becomes an official-release problem and goes through `scienceqa.parse_official_problem`:
  `Context: {hint}` (only for a non-empty hint), the question, `A. ...` options, `<image>` first when the row has
  an image; the label is the letter of `answer`. A malformed row (e.g. 6 choices, `answer` out of range) becomes a
  question with an `error` naming the file, the row and the field, as in the official loader.
- **Ids.** The value of an `id` (or `pid`) column when the dataset has one, else the row's index in the split
  (`"0"`, `"1"`, ...): results are resumed by these ids.
- **Images.** The image column's encoded bytes (an `{bytes, path}` cell; a path without bytes is read from disk; a
  PIL image is saved as PNG) are written unchanged to `<image folder>/<id>/image.<png|jpg|...>`, so that the
  evaluation reads them like the official release's `images/<split>/<pid>/image.png`. The folder defaults to
  `~/.cache/fastv_advanced/hf_images/<sha256 prefix>` (`$XDG_CACHE_HOME` respected).
- **Identity.** `QuestionSet.format` is `"hf"`; its `sha256` hashes, in row order, each question's id, prompt text,
  answer letter, the SHA-256 of its image bytes (and the error of a malformed row), plus the split name: the same
  data gives the same hash from the hub cache or from a local parquet copy, and a re-encoded image changes it. The
  configuration is recorded beside it (`config`), not hashed: it only selects the rows, which the hash covers.

Sources (`--hf-dataset`): a hub id (`lmms-lab/ScienceQA`; read from the `datasets` cache, or downloaded when not
offline), a local folder (a clone of the dataset repository: `<folder>/<config>/<split>-*.parquet`, or
`<folder>/data/<split>-*.parquet`), or one parquet file (the split is the `--split` given, else the file name's
`train-`/`validation-`/`test-` prefix, else test). `datasets` is an optional extra: `pip install -e .[hf]`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .scienceqa import DataError, Question, QuestionSet, _check_duplicates, parse_official_problem

REQUIRED_COLUMNS = ("question", "choices", "answer", "hint", "image")
OTHER_SCHEMA_COLUMNS = ("task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
ID_COLUMNS = ("id", "pid")
DEFAULT_HF_SPLIT = "test"
FILE_SPLITS = ("train", "validation", "test")
IDENTITY_VERSION = "fastv_advanced/hf-scienceqa/1"
INSTALL_HINT = "pip install -e '.[hf]' (or pip install 'datasets>=2.18')"

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


@dataclass(frozen=True)
class HFQuestions:
    """The questions of an HF dataset split and their images' encoded bytes (by question id)."""

    questions: QuestionSet
    images: dict[str, bytes] = field(default_factory=dict)
    files: tuple[str, ...] = ()  # the files the rows were read from (parquet or the datasets cache's Arrow files)


def require_datasets():
    """The `datasets` module; `DataError` saying how to install it when it is missing."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"--hf-dataset needs the optional `datasets` package (with pyarrow), which is not installed: {INSTALL_HINT}"
        ) from exc
    return datasets


def split_of_file(path: Path) -> str | None:
    """`test` for `test-00000-of-00001.parquet` (the hub's file names), None for a name without a split prefix."""
    for split in FILE_SPLITS:
        if path.name.startswith((f"{split}-", f"{split}.", f"{split}_")):
            return split
    return None


def describe_source(source: str, config: str | None, split: str) -> str:
    return f"HF dataset {source}" + (f" (config {config}, split {split})" if config else f" (split {split})")


def open_dataset(source: str | os.PathLike, config: str | None = None, split: str | None = None,
                 cache_dir: str | os.PathLike | None = None):
    """`(dataset, split, files)`: the split of a hub dataset (local cache), a local dataset folder or a parquet file,
    loaded with `datasets`; `DataError` explaining what failed."""
    datasets = require_datasets()
    source_text = str(source)
    path = Path(source_text).expanduser()
    cache_dir = str(cache_dir) if cache_dir is not None else os.environ.get("HF_DATASETS_CACHE") or None
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"--hf-dataset {path}: expected a .parquet file, a dataset folder or a hub id")
        if config is not None:
            raise DataError(f"--hf-config {config!r} selects files of a dataset folder or hub dataset; "
                            f"{path} is one parquet file")
        named = split_of_file(path)
        if split is not None and named is not None and named != split:
            raise DataError(f"--split {split!r}, but {path} is named as split {named!r} (leave --split out, or "
                            "rename the file)")
        split = split or named or DEFAULT_HF_SPLIT
        args, kwargs = ("parquet",), {"data_files": {split: [str(path.resolve())]}}
    else:
        split = split or DEFAULT_HF_SPLIT
        if path.is_dir():
            if config is not None and (path / config).is_dir():
                args, kwargs = (str((path / config).resolve()),), {}
            else:
                args, kwargs = (str(path.resolve()),), {"name": config}
        elif source_text.endswith(".parquet") or source_text.startswith((".", "/", "~")):
            raise DataError(f"--hf-dataset {source_text} does not exist")
        else:
            args, kwargs = (source_text,), {"name": config}
    where = describe_source(source_text, config, split)
    try:
        dataset = datasets.load_dataset(*args, split=split, cache_dir=cache_dir, **kwargs)
    except ValueError as exc:
        hint = " (the official release's 'val' is called 'validation' in HF datasets)" if split == "val" else ""
        raise DataError(f"{where}: {exc}{hint}") from exc
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (ConnectionError, FileNotFoundError, ...)
        hint = ""
        if not path.exists():
            hint = (" (a hub dataset must be in the local datasets cache when offline: load it once on a machine "
                    "with network access and the same HF_HOME/HF_DATASETS_CACHE, or download its parquet files and "
                    "pass the folder or a file to --hf-dataset)")
        raise DataError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}{hint}") from exc
    files = tuple(str(f["filename"]) for f in getattr(dataset, "cache_files", []) or [])
    return dataset, split, files


def check_columns(column_names, where: str) -> None:
    """`DataError` naming each required column the dataset lacks, the columns it has and the schema expected."""
    missing = [c for c in REQUIRED_COLUMNS if c not in column_names]
    if missing:
        raise DataError(
            f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)} "
            f"(columns present: {', '.join(column_names) or 'none'}); expected the ScienceQA schema of "
            f"lmms-lab/ScienceQA and derek-thomas/ScienceQA: {', '.join(REQUIRED_COLUMNS + OTHER_SCHEMA_COLUMNS)}"
        )


def image_bytes(cell, where: str) -> tuple[bytes | None, str | None]:
    """`(bytes, error)` of one image cell: None for no image; `{bytes, path}` dicts, raw bytes, a PIL image."""
    if cell is None:
        return None, None
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), None
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"]), None
        if cell.get("path"):
            try:
                return Path(cell["path"]).read_bytes(), None
            except OSError as exc:
                return None, f"{where}: field 'image' has no bytes and its path {cell['path']!r} cannot be read: {exc}"
        return None, f"{where}: field 'image' has neither bytes nor a path"
    if hasattr(cell, "save") and hasattr(cell, "mode"):  # a decoded PIL image
        buffer = io.BytesIO()
        cell.save(buffer, format="PNG")
        return buffer.getvalue(), None
    return None, f"{where}: field 'image' = {type(cell).__name__} is not an image ({{bytes, path}}, bytes or PIL)"


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes (by their signature; png when unknown: PIL reads by content)."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


def questions_from_dataset(dataset, *, source: str, split: str, config: str | None = None,
                           files: tuple[str, ...] = (), where: str | None = None) -> HFQuestions:
    """The questions of an already loaded `datasets.Dataset` (or anything with `column_names`, `features` and
    `iter(batch_size)`) in the ScienceQA schema."""
    where = where or describe_source(source, config, split)
    if files:
        where += f" [{', '.join(files[:3])}{', ...' if len(files) > 3 else ''}]"
    check_columns(list(dataset.column_names), where)
    datasets = require_datasets()
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # the stored bytes, not decoded
    id_column = next((c for c in ID_COLUMNS if c in dataset.column_names), None)
    columns = list(REQUIRED_COLUMNS) + ([id_column] if id_column else [])
    label = source
    questions: list[Question] = []
    images: dict[str, bytes] = {}
    index = 0
    for batch in dataset.select_columns(columns).iter(batch_size=256):
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            qid = str(row[id_column]) if id_column and row[id_column] is not None else str(index)
            place = f"{label}: row {index}" + (f" (id {qid!r})" if id_column else "")
            data, error = image_bytes(row["image"], place)
            problem = {key: row[key] for key in ("question", "choices", "answer", "hint")}
            problem["image"] = f"image.{image_extension(data)}" if data is not None else None
            question = parse_official_problem(qid, problem, index, label, where=place)
            if error is not None and question.error is None:
                question = Question(qid, "", None, None, index, error)
            if data is not None and question.error is None:
                images[qid] = data
            questions.append(question)
            index += 1
    _check_duplicates(questions, f"{where} column {id_column!r}" if id_column else where)
    digest = identity_sha256(questions, images, split)
    display = str(Path(source).resolve()) if Path(source).exists() else source
    question_set = QuestionSet(display, "hf", digest, split, questions, len(questions), config)
    return HFQuestions(question_set, images, files)


def identity_sha256(questions: list[Question], images: dict[str, bytes], split: str) -> str:
    """SHA-256 of the questions as evaluated: per row id, prompt text, label, image SHA-256, error; and the split."""
    digest = hashlib.sha256(json.dumps({"identity": IDENTITY_VERSION, "split": split}).encode())
    for q in questions:
        image = hashlib.sha256(images[q.id]).hexdigest() if q.id in images else None
        digest.update(b"\n" + json.dumps([q.id, q.text, q.label, image, q.error], ensure_ascii=False).encode())
    return digest.hexdigest()


def load_hf_questions(source: str | os.PathLike, config: str | None = None, split: str | None = None,
                      cache_dir: str | os.PathLike | None = None, progress: bool = True) -> HFQuestions:
    """The questions of one split of an HF ScienceQA dataset (hub id in the cache, local folder or parquet file);
    `progress=False` hides `datasets`' progress bars."""
    datasets = require_datasets()
    shown = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        dataset, split, files = open_dataset(source, config, split, cache_dir)
    finally:
        if shown and not progress:
            datasets.enable_progress_bars()
    if Path(str(source)).expanduser().is_file():
        files = (str(Path(str(source)).expanduser().resolve()),)
    return questions_from_dataset(dataset, source=str(source), split=split, config=config, files=files)


def default_image_dir(sha256: str) -> Path:
    """Where the images of the question set with this hash are written by default."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fastv_advanced" / "hf_images" / sha256[:16]


def write_images(hf: HFQuestions, folder: str | os.PathLike, questions: list[Question] | None = None) -> int:
    """Write the images of `questions` (default: all) to `<folder>/<question.image>`, unchanged bytes; files that
    already hold the same bytes are kept. Returns how many files were written. Safe for several processes at once
    (each writes a temporary file and renames it)."""
    folder = Path(folder)
    written = 0
    for question in hf.questions.questions if questions is None else questions:
        data = hf.images.get(question.id)
        if data is None or question.image is None:
            continue
        path = folder / question.image
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written += 1
    return written

"""Pictures of what FastV keeps, drawn from the per-sample records that `--save-selection` writes.

- Per question (`draw_questions`): the image as the model saw it (padded to a square with the processor's mean
  colour, as LLaVA-1.5 preprocesses; centre-cropped for `--image-aspect-ratio crop`), one panel per configuration
  side by side, the patches it dropped dimmed; a second row of panels with the strategy's scores as a heatmap over
  the patch grid when the records carry `image_scores`. The question, its answer, each configuration's prediction
  and whether it was right are written above and on the panels.
- Over a whole run (`draw_keep_frequency`): for each pruning configuration, how often each patch position was kept
  (share of its questions), with the share of kept tokens in the top and bottom halves of the image.

Records (one JSONL line per question, next to each `scienceqa_results_*.json`): `kept_image_indices`, ascending
indices into the image's n = side × side patch tokens (row-major from the top left, side = √n: 24 for LLaVA-1.5's
576), None for the unpruned baseline; optional `image_scores`, the strategy's n scores. matplotlib (Agg backend),
the `plot` extra.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import compare
from .plotting import pyplot
from .prompting import expand_to_square
from .scienceqa import DataError, load_questions

RECORD_FIELDS = ("correct", "prediction", "label", "image", "error", "pruned", "num_image_tokens",
                 "kept_image_indices", "image_scores")
DEFAULT_QUESTIONS = 3
DPI = 100
PANEL_IN, TITLE_IN, HEADER_IN, MARGIN_IN, GAP_IN, COLORBAR_IN = 2.4, 0.45, 0.45, 0.25, 0.2, 0.9
FREQUENCY_COLUMNS = 5
DROPPED_SHADE = 0.72  # opacity of the dark veil over a dropped patch
RIGHT, WRONG = "#1a7f37", "#c62828"


class VisualizeError(ValueError):
    """Something the pictures cannot be drawn from; the message names the file, flag or question."""


@dataclass
class Configuration:
    """One result file and its per-sample records (question id -> `RECORD_FIELDS` of its JSONL record)."""

    run: compare.Run
    records: dict[str, dict]

    @property
    def label(self) -> str:
        return self.run.short_label

    @property
    def pruned_records(self) -> list[dict]:
        return [r for r in self.records.values() if r.get("kept_image_indices") is not None]


# -- reading --------------------------------------------------------------------------------------------------------


def load_configurations(results_dir: str | os.PathLike) -> tuple[list[Configuration], list[str]]:
    """Every complete result file of `results_dir` with its records, baseline first then the comparison's order,
    and warnings naming what was skipped; `VisualizeError` when nothing is left or the question sets differ."""
    problem = compare.results_dir_problem(results_dir)
    if problem:
        raise VisualizeError(problem)
    configurations, warnings = [], []
    for path in sorted(p for p in Path(results_dir).glob(compare.RESULT_GLOB) if p.is_file()):
        configuration, problem = read_configuration(path)
        if configuration is None:
            warnings.append(f"skipping {path}: {problem}")
        else:
            configurations.append(configuration)
    if not configurations:
        raise VisualizeError(f"no result files ({compare.RESULT_GLOB}) with readable per-sample files in "
                             f"--results-dir {results_dir}")
    if len({c.run.question_sha for c in configurations}) > 1:
        raise VisualizeError(f"the results in --results-dir {results_dir} are on different question sets; draw one "
                             "run's folder at a time")
    return sorted(configurations, key=lambda c: c.run.sort_key()), warnings


def read_configuration(path: Path) -> tuple[Configuration | None, str | None]:
    """(configuration, None) for a complete result file with readable records, else (None, why not)."""
    run, problem = compare.read_result(path)
    if run is None:
        return None, f"it {problem}"
    records, problem = compare.read_samples(run, RECORD_FIELDS)
    return (None, problem) if records is None else (Configuration(run, records), None)


def grid_side(num_image_tokens: int, where: str) -> int:
    """√n for a square patch grid; `VisualizeError` naming `where` otherwise (e.g. a CLS token kept in)."""
    side = math.isqrt(num_image_tokens)
    if side * side != num_image_tokens:
        raise VisualizeError(f"{where}: {num_image_tokens} image tokens are not a square grid of patches")
    return side


def kept_mask(kept: list[int], side: int) -> np.ndarray:
    """Bool [side, side]: True where the patch (row-major from the top left) was kept."""
    mask = np.zeros(side * side, dtype=bool)
    mask[np.asarray(kept, dtype=int)] = True
    return mask.reshape(side, side)


def keep_counts(records: list[dict], num_image_tokens: int) -> np.ndarray:
    """Int [side, side]: how many of `records` kept each patch position (records without a selection count none)."""
    side = grid_side(num_image_tokens, "keep counts")
    counts = np.zeros((side, side), dtype=int)
    for record in records:
        if record.get("kept_image_indices") is not None:
            counts += kept_mask(record["kept_image_indices"], side)
    return counts


def num_image_tokens(configuration: Configuration, record: dict) -> int:
    """Image tokens of the record's image (the model's count for records without one, e.g. failed samples)."""
    n = record.get("num_image_tokens") or configuration.run.config.get("num_image_tokens")
    if not n:
        raise VisualizeError(f"{configuration.run.path.name}: the number of image tokens is recorded neither in the "
                             "per-sample records nor in model_config.num_image_tokens")
    return int(n)


def default_question_ids(configurations: list[Configuration], count: int = DEFAULT_QUESTIONS) -> list[str]:
    """The first `count` questions with an image on which the configurations' answers differ (right for some,
    wrong for others), topped up with the first questions with an image."""
    ids = [qid for qid, r in configurations[0].records.items()
           if r.get("image") and all(qid in c.records for c in configurations)]
    split = [qid for qid in ids if len({bool(c.records[qid].get("correct")) for c in configurations}) > 1]
    return (split + [qid for qid in ids if qid not in split])[:count]


def model_view(image: Image.Image, image_mean: tuple[float, float, float], aspect_ratio: str) -> Image.Image:
    """The square picture the vision tower sees (before resizing): padded with the mean colour (`pad`, LLaVA-1.5's
    `expand2square`, as `prompting.preprocess_image`) or the centre square (`crop`)."""
    image = image.convert("RGB")
    if aspect_ratio == "crop":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side))
    return expand_to_square(image, tuple(int(x * 255) for x in image_mean))


def image_mean(model_path: str | None) -> tuple[float, float, float]:
    """The image processor's mean colour (0-1), from the model folder when it can be read there, else CLIP's (the
    mean of every LLaVA-1.5 checkpoint)."""
    from transformers import AutoImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN

    try:
        return tuple(AutoImageProcessor.from_pretrained(model_path, local_files_only=True).image_mean)
    except (OSError, ValueError, TypeError, AttributeError):
        return tuple(OPENAI_CLIP_MEAN)


# -- per question ---------------------------------------------------------------------------------------------------


@dataclass
class QuestionView:
    """What one row of the per-question picture shows: the question, its answer and the model's view of the image
    (RGB [H, H, 3] uint8)."""

    id: str
    text: str
    answer: str | None
    picture: np.ndarray


def question_views(configurations: list[Configuration], question_ids: list[str], question_file: str | None = None,
                   image_folder: str | None = None) -> list[QuestionView]:
    """The chosen questions read from the question file and image folder the results record (or the ones given);
    `VisualizeError` naming the question, file or flag when one cannot be drawn."""
    first = configurations[0].run
    question_file = question_file or (first.data.get("question_file") or {}).get("path")
    image_folder = image_folder or first.data.get("image_folder")
    recorded = first.data.get("question_file") or {}
    try:
        if recorded.get("format") == "hf" and question_file == recorded.get("path"):
            from .hf_datasets import load_hf_questions

            loaded = load_hf_questions(question_file, recorded.get("config"), recorded.get("split"),
                                       progress=False).questions
        else:
            loaded = load_questions(question_file, recorded.get("split"))
    except DataError as exc:
        raise VisualizeError(f"{exc} (the question file the results record; give it with --question-file)") from exc
    questions = {q.id: q for q in loaded.questions}
    mean = image_mean(first.config.get("model_path"))
    aspect_ratio = first.config.get("image_aspect_ratio") or "pad"
    return [_question_view(questions, qid, configurations, image_folder, mean, aspect_ratio) for qid in question_ids]


def _question_view(questions: dict, qid: str, configurations: list[Configuration], image_folder: str | None,
                   mean: tuple[float, float, float], aspect_ratio: str) -> QuestionView:
    lacking = [c.run.path.name for c in configurations if qid not in c.records]
    if qid not in questions:
        lacking.insert(0, "the question file")
    if lacking:
        known = ", ".join(list(configurations[0].records)[:8])
        raise VisualizeError(f"--question-id {qid}: not in {lacking[0]} (questions of these results: {known}, ...)")
    question = questions[qid]
    if question.image is None:
        raise VisualizeError(f"--question-id {qid}: a text-only question, there is no image to draw")
    path = Path(image_folder or ".") / question.image
    try:
        with Image.open(path) as image:
            picture = np.asarray(model_view(image, mean, aspect_ratio))
    except OSError as exc:
        raise VisualizeError(f"image {path} of question {qid} cannot be read ({exc}); give the image folder with "
                             "--image-folder") from exc
    text = " ".join(question.text.replace("<image>", "").split())
    return QuestionView(qid, text, question.label, picture)


def draw_questions(configurations: list[Configuration], views: list[QuestionView], path: str | os.PathLike) -> Path:
    """One block per question (its text and answer above), one column per configuration: the model's view of the
    image with the dropped patches dimmed, titled with the prediction (✓/✗); a second row with the scores' rank
    heatmap (0 = lowest, 1 = highest of the image) when the configuration's record has `image_scores`.

    Size: (2·MARGIN + columns·PANEL + (columns−1)·GAP) × (2·MARGIN + Σ blocks + (questions−1)·GAP) inches at `DPI`,
    a block being HEADER + rows·(TITLE + PANEL)."""
    plt = pyplot("fastv-visualize")
    columns, rows = len(configurations), [_score_rows(configurations, v.id) + 1 for v in views]
    width = 2 * MARGIN_IN + columns * PANEL_IN + (columns - 1) * GAP_IN
    height = 2 * MARGIN_IN + sum(HEADER_IN + r * (TITLE_IN + PANEL_IN) for r in rows) + (len(views) - 1) * GAP_IN
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    top = height - MARGIN_IN
    for view, block_rows in zip(views, rows):
        _question_header(fig, view, top, width, height)
        for column, configuration in enumerate(configurations):
            left = MARGIN_IN + column * (PANEL_IN + GAP_IN)
            _question_panels(fig, configuration, view, (left, top - HEADER_IN), (width, height))
        top -= HEADER_IN + block_rows * (TITLE_IN + PANEL_IN) + GAP_IN
    return _save(fig, plt, path)


def _score_rows(configurations: list[Configuration], qid: str) -> int:
    return int(any(c.records[qid].get("image_scores") is not None for c in configurations))


def _question_header(fig, view: QuestionView, top: float, width: float, height: float) -> None:
    """At most two lines: the question's id, answer and text (shortened to fit)."""
    chars = int((width - 2 * MARGIN_IN) * 13)
    text = textwrap.shorten(f"Question {view.id} (answer {view.answer}): {view.text}", width=2 * chars,
                            placeholder=" …")
    fig.text(MARGIN_IN / width, (top - 0.05) / height, "\n".join(textwrap.wrap(text, chars)), ha="left", va="top",
             fontsize=10)


def _question_panels(fig, configuration: Configuration, view: QuestionView, corner: tuple[float, float],
                     size: tuple[float, float]) -> None:
    """The kept-patches panel (and the scores panel below it) of one configuration, `corner` = (left, top) in
    inches."""
    record = configuration.records[view.id]
    n = num_image_tokens(configuration, record)
    side = grid_side(n, f"{configuration.run.path.name} question {view.id}")
    kept = record.get("kept_image_indices")
    mask = np.ones((side, side), dtype=bool) if kept is None else kept_mask(kept, side)
    verdict = "✓" if record.get("correct") else "✗"
    title = f"{configuration.label}\n{int(mask.sum())}/{n} kept · {record.get('prediction') or 'no answer'} {verdict}"
    (left, top), (width, height) = corner, size
    axes = _panel(fig, left, top - TITLE_IN - PANEL_IN, width, height)
    axes.set_title(title, fontsize=9, color=RIGHT if record.get("correct") else WRONG)
    _draw_kept(axes, view.picture, mask)
    if record.get("image_scores") is not None:
        axes = _panel(fig, left, top - 2 * (TITLE_IN + PANEL_IN), width, height)
        axes.set_title("scores (rank in the image)", fontsize=8.5)
        _draw_scores(axes, view.picture, np.asarray(record["image_scores"], dtype=float), side)


def _panel(fig, left: float, bottom: float, width: float, height: float):
    axes = fig.add_axes((left / width, bottom / height, PANEL_IN / width, PANEL_IN / height))
    axes.set_xticks([])
    axes.set_yticks([])
    return axes


def _draw_kept(axes, picture: np.ndarray, mask: np.ndarray) -> None:
    """picture: [H, H, 3]; mask: bool [side, side], the patch grid laid over the picture."""
    side = mask.shape[0]
    axes.imshow(picture, extent=(0, side, side, 0))
    veil = np.zeros((side, side, 4))
    veil[..., 3] = np.where(mask, 0.0, DROPPED_SHADE)
    axes.imshow(veil, extent=(0, side, side, 0), interpolation="nearest")


def _draw_scores(axes, picture: np.ndarray, scores: np.ndarray, side: int) -> None:
    """scores: [side·side]; drawn as ranks (0-1) over a faint copy of the picture."""
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") / max(len(scores) - 1, 1)
    axes.imshow(picture, extent=(0, side, side, 0), alpha=0.35)
    axes.imshow(ranks.reshape(side, side), extent=(0, side, side, 0), cmap="inferno", vmin=0, vmax=1, alpha=0.8,
                interpolation="nearest")


# -- over a whole run -----------------------------------------------------------------------------------------------


def draw_keep_frequency(configurations: list[Configuration], path: str | os.PathLike) -> Path:
    """One heatmap per pruning configuration (up to `FREQUENCY_COLUMNS` a row): the share of its questions that kept
    each patch position, 0-1, titled with the share of kept tokens in the top and bottom halves of the image."""
    pruned = [c for c in configurations if c.pruned_records]
    if not pruned:
        names = ", ".join(c.run.path.name for c in configurations[:3])
        raise VisualizeError(f"no per-sample record has kept_image_indices ({names}): run the evaluation or sweep "
                             "with --save-selection")
    plt = pyplot("fastv-visualize")
    columns = min(len(pruned), FREQUENCY_COLUMNS)
    rows = math.ceil(len(pruned) / columns)
    width = 2 * MARGIN_IN + columns * PANEL_IN + (columns - 1) * GAP_IN + COLORBAR_IN
    height = 2 * MARGIN_IN + HEADER_IN + rows * (TITLE_IN + PANEL_IN) + (rows - 1) * GAP_IN
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.text(MARGIN_IN / width, 1 - MARGIN_IN / height, "How often each patch position was kept (share of the "
             "questions), top of the image at the top", ha="left", va="top", fontsize=11)
    for k, configuration in enumerate(pruned):
        left = MARGIN_IN + (k % columns) * (PANEL_IN + GAP_IN)
        top = height - MARGIN_IN - HEADER_IN - (k // columns) * (TITLE_IN + PANEL_IN + GAP_IN)
        image = _frequency_panel(fig, configuration, left, top - TITLE_IN - PANEL_IN, (width, height))
    bar = fig.add_axes(((width - COLORBAR_IN + 0.2) / width, (height - MARGIN_IN - HEADER_IN - TITLE_IN - PANEL_IN)
                        / height, 0.15 / width, PANEL_IN / height))
    fig.colorbar(image, cax=bar, label="share kept")
    return _save(fig, plt, path)


def _frequency_panel(fig, configuration: Configuration, left: float, bottom: float, size: tuple[float, float]):
    records = configuration.pruned_records
    counts = keep_counts(records, num_image_tokens(configuration, records[0]))
    share = counts / len(records)
    half = counts.shape[0] // 2
    total = max(int(counts.sum()), 1)
    top_share, bottom_share = counts[:half].sum() / total, counts[-half:].sum() / total
    axes = _panel(fig, left, bottom, *size)
    axes.set_title(f"{configuration.label} ({len(records)} questions)\nkept tokens: top half {100 * top_share:.0f}%,"
                   f" bottom {100 * bottom_share:.0f}%", fontsize=8.5)
    return axes.imshow(share, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")


def _save(fig, plt, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path

"""A synthetic ScienceQA-style set: shapes on a 3x3 grid, questions that need one region of the image.

Every image is 336x336 (the LLaVA-1.5 CLIP input size, so padding and resizing leave it unchanged) and holds
3-5 objects, each in its own cell of a 3x3 grid (112 px cells). An object has a shape (circle, square,
triangle, star, diamond, cross) and a colour (red, green, blue, yellow, purple, orange). Each question asks
about ONE cell, named `top left` ... `bottom right` (`centre` in the middle):

- `colour`: "What colour is the shape in the top left?" - 2-5 colour options;
- `shape`:  "Which shape is in the bottom right?" - 2-5 shape options;
- `yes_no`: "Is the shape in the centre red?" / "Is there a star in the top middle?" (the cell may be empty) -
  options `yes` / `no` in either order.

Distractor options are taken first from the other objects of the same image, so an answer cannot be read off a
colour or shape that merely appears somewhere in the picture: the question's cell has to be looked at. Within
every option count the answer letters are balanced exactly (a shuffled, cycled assignment), so the text alone
gives no hint; chance accuracy is the mean of 1/(number of options). About half the questions carry a
non-informative `Context:` line, as many ScienceQA questions do.

The output is a LLaVA question file (the format of `himap-inference-MCQ.json`):

    [{"id": "1", "image": "1/image.png", "conversations": [
        {"from": "human", "value": "<image>\\nContext: ...\\nWhat colour is ...?\\nA. red\\nB. blue"},
        {"from": "gpt", "value": "B"}]}, ...]

with images at `<image-folder>/<id>/image.png`. Everything is derived from `(seed, index)` with Python's
`random.Random` seeded by a string (stable across Python versions), so the same seed gives byte-identical JSON
and identical images, and any single question can be regenerated on its own.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
IMAGE_SIZE = 336
BACKGROUND = (255, 255, 255)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
POSITION_NAMES = {  # (rows, columns) -> name of each cell; cell index = row * columns + column
    (3, 1): ("top row", "middle row", "bottom row"),
    (2, 2): ("top left", "top right", "bottom left", "bottom right"),
    (3, 3): (
        "top left", "top middle", "top right",
        "middle left", "centre", "middle right",
        "bottom left", "bottom middle", "bottom right",
    ),
}
LETTERS = ("A", "B", "C", "D", "E")
QUESTION_TYPES = ("colour", "shape", "yes_no")

CONTEXTS = (
    "The picture shows shapes on a three by three grid.",
    "Each part of the grid holds at most one shape.",
    "Look closely at the picture. Some parts of the grid are empty.",
    "A student drew some shapes with coloured pencils.",
    "Every shape in the picture has one colour.",
)
COLOUR_TEMPLATES = ("What colour is the shape in the {pos}?", "Which colour is the shape in the {pos}?")
SHAPE_TEMPLATES = ("Which shape is in the {pos}?", "What shape is in the {pos}?")
YES_NO_COLOUR_TEMPLATE = "Is the shape in the {pos} {colour}?"
YES_NO_SHAPE_TEMPLATE = "Is there a {shape} in the {pos}?"

# Seeds and first ids of the two splits (different seeds and disjoint id ranges).
TEST_SEED, TEST_ID_START = 2017, 1
TRAIN_SEED, TRAIN_ID_START = 12726, 100001


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: grid cell (row * columns + column), shape, colour name, box side and centre in pixels."""

    cell: int
    shape: str
    colour: str
    size: int
    cx: int
    cy: int


@dataclass(frozen=True)
class SyntheticQuestion:
    """One generated question: its LLaVA question-file entry, its scene and what it asks about."""

    entry: dict
    objects: tuple[SceneObject, ...]
    question_type: str
    cell: int
    options: tuple[str, ...]

    @property
    def id(self) -> str:
        return self.entry["id"]

    @property
    def answer(self) -> str:
        return self.entry["conversations"][1]["value"]

    @property
    def num_options(self) -> int:
        return len(self.options)

    def render(self) -> Image.Image:
        """The question's image (RGB, 336x336)."""
        return render_scene(self.objects)


# -- drawing ---------------------------------------------------------------------------------------------------------


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    half = obj.size / 2
    cx, cy, fill = obj.cx, obj.cy, COLOURS[obj.colour]
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        inset = round(half * 0.12)
        draw.rectangle((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy + half * 0.05, half * 1.05), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half * 0.75, cy), (cx, cy + half), (cx - half * 0.75, cy)], fill=fill)
    elif obj.shape == "cross":
        arm = half * 0.34
        draw.rectangle((round(cx - arm), box[1], round(cx + arm), box[3]), fill=fill)
        draw.rectangle((box[0], round(cy - arm), box[2], round(cy + arm)), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(objects: tuple[SceneObject, ...] | list[SceneObject]) -> Image.Image:
    """Draw objects on a white 336x336 RGB canvas (no anti-aliasing: few colours, small PNGs)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj)
    return image


# -- questions -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How a split is generated (the shipped test split and the embedded model use `DEFAULT_RECIPE`).

    grid: (rows, columns) of cells: (3, 3) names corners, middles and the centre; (2, 2) only corners; (3, 1)
        horizontal bands (`top row`, `middle row`, `bottom row`).
    question_types: (type, weight) pairs among `colour`, `shape`, `yes_no`.
    option_order: `shuffled` - the answer at the planned letter among distractors in random order;
        `sorted` - a subset of the colours or shapes listed in their canonical order (`COLOURS`, `SHAPES`), with
        the subset chosen so that the answer lands on the planned letter;
        `fixed` - the first N colours or shapes in canonical order (so a colour always has the same letter).
        `yes_no` options are `yes`, `no` in that order unless `shuffled`.
    size_range: object size as a fraction of the cell side.
    """

    grid: tuple[int, int] = (3, 3)
    min_objects: int = 3
    max_objects: int = 5
    size_range: tuple[float, float] = (0.55, 0.8)
    question_types: tuple[tuple[str, float], ...] = (("colour", 0.5), ("shape", 0.5))
    option_order: str = "fixed"
    min_options: int = 2
    max_options: int = 5
    context_probability: float = 0.5

    def __post_init__(self) -> None:
        if self.grid not in POSITION_NAMES:
            raise ValueError(f"grid={self.grid} is not supported; choose one of {sorted(POSITION_NAMES)}")
        if self.option_order not in ("shuffled", "sorted", "fixed"):
            raise ValueError(f"option_order={self.option_order!r}: choose shuffled, sorted or fixed")
        if not 2 <= self.min_options <= self.max_options <= len(LETTERS):
            raise ValueError(f"options must satisfy 2 <= min_options <= max_options <= {len(LETTERS)}")
        unknown = {name for name, _ in self.question_types} - set(QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question types {sorted(unknown)}; choose among {QUESTION_TYPES}")

    @property
    def positions(self) -> tuple[str, ...]:
        return POSITION_NAMES[self.grid]

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cell_shape(self) -> tuple[int, int]:
        """(height, width) of a cell in pixels."""
        return IMAGE_SIZE // self.grid[0], IMAGE_SIZE // self.grid[1]


def _scene(rng: random.Random, recipe: Recipe) -> list[SceneObject]:
    count = rng.randint(recipe.min_objects, recipe.max_objects)
    cells = sorted(rng.sample(range(recipe.num_cells), count))
    height, width = recipe.cell_shape
    side = min(height, width)
    objects = []
    for cell in cells:
        size = rng.randint(round(recipe.size_range[0] * side), round(recipe.size_range[1] * side))
        slack_x = max(0, (width - size) // 2 - 4)  # keep the object inside its cell with a 4 px margin
        slack_y = max(0, (height - size) // 2 - 4)
        row, col = divmod(cell, recipe.grid[1])
        cx = col * width + width // 2 + rng.randint(-slack_x, slack_x)
        cy = row * height + height // 2 + rng.randint(-slack_y, slack_y)
        objects.append(SceneObject(cell, rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, cx, cy))
    return objects


def _pick(rng: random.Random, candidates: list[str], count: int, preferred: set[str]) -> list[str]:
    """`count` of `candidates`, those in `preferred` first (each group in random order)."""
    first = [c for c in candidates if c in preferred]
    rest = [c for c in candidates if c not in preferred]
    rng.shuffle(first)
    rng.shuffle(rest)
    return (first + rest)[:count]


def _choose_options(
    rng: random.Random, order: tuple[str, ...], present: set[str], num_options: int, answer_index: int, mode: str
) -> list[str]:
    """The option list (the answer at `answer_index`), distractors preferably among the `present` attributes."""
    if mode == "fixed":
        return list(order[:num_options])
    if mode == "sorted":
        feasible = [r for r in range(len(order)) if r >= answer_index and len(order) - 1 - r >= num_options - 1 - answer_index]
        rank = rng.choice(feasible)
        before = _pick(rng, list(order[:rank]), answer_index, present)
        after = _pick(rng, list(order[rank + 1 :]), num_options - 1 - answer_index, present)
        return sorted(before + [order[rank]] + after, key=order.index)
    answer = rng.choice(order)
    distractors = _pick(rng, [a for a in order if a != answer], num_options - 1, present)
    return distractors[:answer_index] + [answer] + distractors[answer_index:]


def _plan(seed: int, num_questions: int, recipe: Recipe) -> list[tuple[str, int, int]]:
    """(question type, number of options, answer index) per question, letters balanced within each option count."""
    rng = random.Random(f"fastv-synthetic-plan-{GENERATOR_VERSION}-{seed}")
    names = [name for name, _ in recipe.question_types]
    weights = [weight for _, weight in recipe.question_types]
    kinds = [rng.choices(names, weights)[0] for _ in range(num_questions)]
    counts = [2 if kind == "yes_no" else rng.randint(recipe.min_options, recipe.max_options) for kind in kinds]
    answers = [0] * num_questions
    for n in range(2, len(LETTERS) + 1):
        indices = [i for i, c in enumerate(counts) if c == n]
        letters = [k % n for k in range(len(indices))]
        rng.shuffle(letters)
        for i, letter in zip(indices, letters):
            answers[i] = letter
    return list(zip(kinds, counts, answers))


def make_question(
    seed: int, index: int, plan: tuple[str, int, int], id_start: int = 1, recipe: Recipe | None = None
) -> SyntheticQuestion:
    """Question `index` of the split generated from `seed`, given its planned type, option count and answer."""
    recipe = recipe or DEFAULT_RECIPE
    kind, num_options, answer_index = plan
    rng = random.Random(f"fastv-synthetic-question-{GENERATOR_VERSION}-{seed}-{index}")
    objects = _scene(rng, recipe)
    positions = recipe.positions
    target_index = rng.randrange(len(objects))
    target = objects[target_index]
    others = [obj for i, obj in enumerate(objects) if i != target_index]
    attribute = "colour" if kind == "colour" or (kind == "yes_no" and rng.random() < 0.5) else "shape"
    order = tuple(COLOURS) if attribute == "colour" else SHAPES
    present = {getattr(obj, attribute) for obj in others}
    if kind == "yes_no":
        yes_first = recipe.option_order != "shuffled" or rng.random() < 0.5
        options = ["yes", "no"] if yes_first else ["no", "yes"]
        truth = options[answer_index] == "yes"
        value = getattr(target, attribute)
        if not truth:  # a false statement, preferably naming something that is elsewhere in the picture
            value = _pick(rng, [a for a in order if a != value], 1, present)[0]
        if attribute == "colour":
            text = YES_NO_COLOUR_TEMPLATE.format(pos=positions[target.cell], colour=value)
        else:
            text = YES_NO_SHAPE_TEMPLATE.format(pos=positions[target.cell], shape=value)
    else:
        options = _choose_options(rng, order, present, num_options, answer_index, recipe.option_order)
        answer = options[answer_index]
        objects[target_index] = target = replace(target, **{attribute: answer})
        if recipe.option_order != "shuffled":
            # Put distractor values into the picture, so that the question's cell has to be looked at.
            distractors = [o for o in options if o != answer]
            for i, obj in enumerate(objects):
                if i != target_index and rng.random() < 0.5:
                    objects[i] = replace(obj, **{attribute: rng.choice(distractors)})
        templates = COLOUR_TEMPLATES if kind == "colour" else SHAPE_TEMPLATES
        text = rng.choice(templates).format(pos=positions[target.cell])
    if rng.random() < recipe.context_probability:
        text = f"Context: {rng.choice(CONTEXTS)}\n{text}"
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    qid = str(id_start + index)
    entry = {
        "id": qid,
        "image": f"{qid}/image.png",
        "conversations": [
            {"from": "human", "value": "<image>\n" + text + "\n" + "\n".join(lines)},
            {"from": "gpt", "value": LETTERS[answer_index]},
        ],
    }
    return SyntheticQuestion(
        entry=entry, objects=tuple(objects), question_type=kind, cell=target.cell, options=tuple(options)
    )


def generate_split(
    seed: int, num_questions: int, id_start: int = 1, recipe: Recipe | None = None
) -> list[SyntheticQuestion]:
    """`num_questions` questions from `seed`, ids `id_start, id_start + 1, ...` (images are rendered on demand)."""
    recipe = recipe or DEFAULT_RECIPE
    plan = _plan(seed, num_questions, recipe)
    return [make_question(seed, i, plan[i], id_start, recipe) for i in range(num_questions)]


def questions_json(questions: list[SyntheticQuestion]) -> str:
    """The question file's text (stable formatting, so the same questions give the same bytes)."""
    return json.dumps([q.entry for q in questions], indent=1, ensure_ascii=False) + "\n"


def write_split(questions: list[SyntheticQuestion], question_file: str | Path, image_folder: str | Path) -> None:
    """Write the question file and every image to `<image_folder>/<id>/image.png`."""
    question_file, image_folder = Path(question_file), Path(image_folder)
    question_file.parent.mkdir(parents=True, exist_ok=True)
    question_file.write_text(questions_json(questions), encoding="utf-8")
    for question in questions:
        path = image_folder / question.entry["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        question.render().save(path, format="PNG", optimize=True)


def corpus(questions: list[SyntheticQuestion]) -> list[str]:
    """Tokenizer training texts: the words of each question's whole LLaVA conversation, one word per text.

    Each question contributes its full single-prediction prompt (system message, question, options, instruction)
    and its answer, so word frequencies are those the model sees. `tiny.build_tokenizer` learns merges inside each
    text, so giving words one by one keeps tokens within words (`▁red`, `▁left?`, the answer `▁B`) instead of
    fusing phrases such as `red\\nB.`. Words at the start of a line (`What`, `Context:`, the option letters) are
    left out: in the prompt they follow a newline, not a space, so merges learned for `▁What` would not apply to
    them, and leaving them out keeps every option line tokenized alike (`\\n`, `B`, `.`, `▁red`).
    """
    from .prompting import build_prompt

    words = []
    for question in questions:
        conversation = question.entry["conversations"]
        text = build_prompt(conversation[0]["value"], has_image=True, single_pred_prompt=True)
        text = text.replace("<image>", "") + " " + conversation[1]["value"]
        for line_index, line in enumerate(text.split("\n")):
            line_words = line.split()
            words += line_words[1:] if line_index > 0 else line_words
    return words


def chance_accuracy(questions: list[SyntheticQuestion]) -> float:
    """Expected accuracy of uniform guessing: mean of 1 / number of options."""
    return sum(1.0 / q.num_options for q in questions) / len(questions)


# The shipped split and the embedded model: one object per picture, colour questions. Region questions among 3-5
# objects (`Recipe()`'s defaults) did not train past chance on 2 CPU cores within the training budget.
DEFAULT_RECIPE = Recipe(min_objects=1, max_objects=1, question_types=(("colour", 1.0),))

"""Shared fixtures: a tiny LLaVA saved in the transformers format and a small ScienceQA question set.

Everything is built offline: `save_tiny_llava` (image 32 px, patch 4 -> 64 image tokens, 4 decoder layers) and
synthetic PNG images drawn here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGE_TOKENS = 64  # (32 // 4) ** 2
TINY_LAYERS = 4

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 30)]


def draw_image(path: Path, seed: int, size=(40, 30)) -> None:
    """A small non-square picture with one coloured shape (deterministic from `seed`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x = 4 + (seed * 7) % 20
    draw.ellipse([x, 6, x + 12, 18], fill=COLOURS[seed % len(COLOURS)])
    image.save(path)


def llava_entry(qid: str, question: str, options: list[str], label: str, image: str | None, hint: str = "") -> dict:
    lines = ([f"Context: {hint}"] if hint else []) + [question] + [f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options)]
    text = ("<image>\n" if image else "") + "\n".join(lines)
    entry = {"id": qid}
    if image:
        entry["image"] = image
    entry["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": label}]
    return entry


def write_question_set(root: Path, num_image_questions: int = 5, text_only: bool = True) -> tuple[Path, Path]:
    """A LLaVA question file + images under `root`; returns (question_file, image_folder)."""
    images = root / "images" / "test"
    entries = []
    for i in range(num_image_questions):
        qid = str(10 + i)
        draw_image(images / qid / "image.png", i, size=(40 + 3 * i, 30))
        entries.append(
            llava_entry(qid, "Which shape is red?", ["circle", "square", "star"][: 2 + i % 2], "AB"[i % 2],
                        f"{qid}/image.png", hint="Look at the picture." if i % 2 else "")
        )
    if text_only:
        entries.append(llava_entry("99", "Which word is a colour?", ["circle", "yellow"], "B", None))
    question_file = root / "questions.json"
    question_file.write_text(json.dumps(entries, indent=1))
    return question_file, images


@pytest.fixture()
def one_torch_thread():
    """One torch thread for in-process runs, restored afterwards: on a shared 2-core machine two threads that wait
    on a busy core are much slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from fastv_advanced.tiny import save_tiny_llava

    path = tmp_path_factory.mktemp("models") / "tiny-llava"
    save_tiny_llava(path, seed=0, image_size=32, patch_size=4)
    return path


@pytest.fixture()
def question_set(tmp_path) -> tuple[Path, Path]:
    """(question_file, image_folder): 5 image questions and 1 text-only question, in a fresh folder."""
    return write_question_set(tmp_path / "scienceqa")

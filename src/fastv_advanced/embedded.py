"""The embedded default: a tiny LLaVA and a ScienceQA-format sample shipped in the repository.

With the environment variable `FASTV_EMBEDDED=1`, the evaluation (and the sweep) replace `--model-path`,
`--question-file` and `--image-folder` by the embedded files, so the guide's commands run as written on a machine
without the 7B weights or the dataset. The paths are relative to the repository root (two levels above the
package's `src` directory), so they exist in a source checkout (`pip install -e .`), not in a wheel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

ENV_VAR = "FASTV_EMBEDDED"
REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = REPO_ROOT / "models" / "tiny-llava-scienceqa"
QUESTION_FILE = REPO_ROOT / "data" / "scienceqa" / "himap-inference-MCQ.json"
IMAGE_FOLDER = REPO_ROOT / "data" / "scienceqa" / "images" / "test"

_FALSE = {"", "0", "false", "no", "off"}


def embedded_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when `FASTV_EMBEDDED` is set to something other than empty/0/false/no/off."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_VAR, "").strip().lower() not in _FALSE


def resolve_embedded(
    model_path: str | None,
    question_file: str | None,
    image_folder: str | None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str | None, str | None, str | None, str | None]:
    """`(model_path, question_file, image_folder, notice)`.

    Unchanged with `notice = None` unless `FASTV_EMBEDDED` is on; then the three embedded paths and a one-line
    notice that says which values they replace.
    """
    if not embedded_enabled(environ):
        return model_path, question_file, image_folder, None
    replaced = [f"{flag} {value}" for flag, value in
                (("--model-path", model_path), ("--question-file", question_file), ("--image-folder", image_folder))
                if value is not None]
    notice = (
        f"{ENV_VAR}=1: using the embedded tiny model {MODEL_PATH}, question file {QUESTION_FILE} and images "
        f"{IMAGE_FOLDER}" + (f" (instead of {', '.join(replaced)})" if replaced else "")
    )
    return str(MODEL_PATH), str(QUESTION_FILE), str(IMAGE_FOLDER), notice

"""`python -m lmms_eval --model fastv_llava ...` offline, end to end, on the embedded model: a local task in
lmms-eval's task format (scienceqa_img's prompt: context, question, lettered options, the answer instruction) over
the first shipped questions written as a parquet file in the lmms-lab/ScienceQA schema. The answers must be those
`eval_scivqa.py` gives with the same method, and the accuracy lmms-eval reports must be theirs.

lmms-eval is an optional extra; CI installs it without its dependencies (it requires torchvision, whose wheel does
not load beside the CPU torch build) plus the few modules its command line imports (see .ci/run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT
from fastv_advanced.cli import eval_scivqa

pytest.importorskip("lmms_eval", reason="the lmms-eval extra is not installed (pip install -e '.[lmms-eval]')")
datasets = pytest.importorskip("datasets")

MODEL = REPO_ROOT / "models" / "tiny-llava-scienceqa"
QUESTIONS = REPO_ROOT / "data" / "scienceqa" / "himap-inference-MCQ.json"
IMAGES = REPO_ROOT / "data" / "scienceqa" / "images" / "test"
NUM_QUESTIONS = 8
METHOD = "pruning_method=fastv,agg_layer=2,attention_rank=144,token_selection_method=max_head"

TASK_YAML = """\
task: fastv_sqa_local
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
process_results: !function utils.process_results
metadata:
  - version: 0.0
"""

TASK_UTILS = '''\
def doc_to_visual(doc):
    return [] if doc["image"] is None else [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\\n".join(f"{chr(65 + i)}. {choice}" for i, choice in enumerate(doc["choices"]))
    context = f"Context: {doc['hint']}\\n" if doc["hint"] else ""
    return f"{context}{doc['question']}\\n{options}\\nAnswer with the option's letter from the given choices directly."


def doc_to_target(doc):
    return chr(65 + doc["answer"])


def process_results(doc, results):
    return {"exact_match": float(results[0].strip()[:1] == doc_to_target(doc))}
'''


def lmms_rows() -> dict:
    """The first shipped questions in the lmms-lab/ScienceQA columns (hint, question, choices, answer, image)."""
    from PIL import Image

    rows = {"image": [], "question": [], "choices": [], "answer": [], "hint": []}
    for entry in json.loads(QUESTIONS.read_text())[:NUM_QUESTIONS]:
        lines = entry["conversations"][0]["value"].replace("<image>\n", "").split("\n")
        hint = lines.pop(0)[len("Context: "):] if lines[0].startswith("Context: ") else ""
        question, options = lines[0], lines[1:]
        rows["hint"].append(hint)
        rows["question"].append(question)
        rows["choices"].append([option[3:] for option in options])
        rows["answer"].append("ABCDE".index(entry["conversations"][1]["value"]))
        rows["image"].append(Image.open(IMAGES / entry["image"]).convert("RGB"))
    return rows


def test_lmms_eval_runs_fastv_llava_offline_with_the_evaluations_answers(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    parquet = tmp_path / "sqa.parquet"
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("int64"), "hint": datasets.Value("string")})
    datasets.Dataset.from_dict(lmms_rows(), features=features).to_parquet(str(parquet))
    (task / "fastv_sqa_local.yaml").write_text(TASK_YAML.format(parquet=parquet))
    (task / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    out = tmp_path / "lmms"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "fastv_llava", "--model_args",
         f"pretrained={MODEL},device=cpu,{METHOD}", "--tasks", "fastv_sqa_local", "--include_path", str(task),
         "--batch_size", "1", "--output_path", str(out), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (samples_file,) = out.rglob("*fastv_sqa_local*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    answers = [sample["filtered_resps"][0] for sample in samples]
    assert len(answers) == NUM_QUESTIONS

    reference = tmp_path / "reference"
    assert eval_scivqa.main([
        "--model-path", str(MODEL), "--question-file", str(QUESTIONS), "--image-folder", str(IMAGES),
        "--single-pred-prompt", "--use-fast-v", "--fast-v-agg-layer", "2", "--fast-v-attention-rank", "144",
        "--fast-v-token-selection-method", "max_head", "--num-samples", str(NUM_QUESTIONS), "--device", "cpu",
        "--max-new-tokens", "8", "--no-progress", "--output-dir", str(reference)]) == 0
    (reference_file,) = reference.glob("scienceqa_results_*.jsonl")
    records = [json.loads(line) for line in reference_file.read_text().splitlines()]
    records = [r for r in records if r.get("type") == "sample"]
    assert answers == [r["output"] for r in records]
    (results_file,) = [p for p in out.rglob("*results*.json")]
    accuracy = json.loads(results_file.read_text())["results"]["fastv_sqa_local"]["exact_match,none"]
    assert accuracy == pytest.approx(sum(r["correct"] for r in records) / NUM_QUESTIONS)

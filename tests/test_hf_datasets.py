"""ScienceQA from HF datasets (`--hf-dataset`): the prompts equal the official release's, question by question.

One small official release (`problems.json`, `pid_splits.json`, `images/<split>/<pid>/image.png`) is written here,
then the same problems as parquet files in the real schemas of `lmms-lab/ScienceQA` (configs ScienceQA-IMG and
ScienceQA-FULL, files `<config>/<split>-00000-of-00001.parquet`, a README with the configs) and
`derek-thomas/ScienceQA` (`data/<split>-00000-of-00001-<hash>.parquet`), written with `datasets` and the column
types of their dataset cards (image Image, choices sequence of string, answer int8, the rest string). Nothing is
downloaded: the hub is off (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: it reads these once
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402

from conftest import REPO_ROOT, draw_image  # noqa: E402
from fastv_advanced import hf_datasets  # noqa: E402
from fastv_advanced.hf_datasets import load_hf_questions, questions_from_dataset, write_images  # noqa: E402
from fastv_advanced.prompting import build_prompt  # noqa: E402
from fastv_advanced.scienceqa import DataError, load_image, load_official_questions  # noqa: E402
from test_eval_scivqa import cli, read_jsonl, subprocess_env  # noqa: E402

SUITE = REPO_ROOT / "src" / "HiMAP" / "inference" / "eval_scivqa_fastv_advanced.sh"

META = {"task": "closed choice", "grade": "grade4", "subject": "natural science", "topic": "physics",
        "category": "Synthetic", "skill": "Synthetic sample", "lecture": "A lecture.", "solution": "A solution."}
# (pid, split, question, choices, answer, hint, has image): hints empty, padded, multi-line; 2 to 5 choices;
# text-only problems; non-ASCII text.
PROBLEMS = [
    ("101", "test", "Which shape is red?", ["circle", "square"], 1, "Look at the picture.", True),
    ("102", "test", "Which colour is the large shape?", ["red", "green", "blue"], 2, "", True),
    ("103", "test", "Which word is a colour?", ["circle", "yellow"], 1, "Colours are words.", False),
    ("104", "test", "How many circles are there? ", ["one", "two", "three", "four", "five"], 0, "  ", True),
    ("105", "test", "Which is warmer — 30 °C or 10 °C?", ["30 °C", "10 °C"], 0, " Temperatures:\n30 °C and 10 °C ",
     True),
    ("106", "test", "Which sentence is a question?", ["Is it red?", "It is red."], 0, "", False),
    ("107", "test", "Which animal has fur?", ["fox", "frog", "fish"], 0, "Mammals have fur.", True),
    ("201", "val", "Which shape is blue?", ["circle", "square"], 0, "", True),
    ("202", "val", "Which word rhymes with cat?", ["hat", "dog"], 0, "", False),
    ("301", "train", "Which shape is green?", ["star", "circle"], 1, "", True),
]
HF_SPLIT = {"train": "train", "val": "validation", "test": "test"}


def feature_types():
    sequence = getattr(datasets, "List", None) or datasets.Sequence
    features = {"image": datasets.Image(), "question": datasets.Value("string"),
                "choices": sequence(datasets.Value("string")), "answer": datasets.Value("int8"),
                "hint": datasets.Value("string")}
    features.update({name: datasets.Value("string") for name in META})
    return datasets.Features(features)


def write_official(root: Path) -> Path:
    problems, splits = {}, {"train": [], "val": [], "test": []}
    for seed, (pid, split, question, choices, answer, hint, has_image) in enumerate(PROBLEMS):
        problems[pid] = {"question": question, "choices": choices, "answer": answer, "hint": hint,
                         "image": "image.png" if has_image else None, **META, "split": split}
        splits[split].append(pid)
        if has_image:
            draw_image(root / "images" / split / pid / "image.png", seed, size=(40 + 3 * seed, 30))
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems, indent=1, ensure_ascii=False))
    (root / "pid_splits.json").write_text(json.dumps(splits, indent=1))
    return root


def hf_rows(release: Path, split: str, images_only: bool) -> dict:
    """The columns of an HF ScienceQA split made from the official release's problems, in its split order."""
    problems = json.loads((release / "problems.json").read_text())
    pids = json.loads((release / "pid_splits.json").read_text())[split]
    columns = {name: [] for name in feature_types()}
    for pid in pids:
        problem = problems[pid]
        if images_only and not problem["image"]:
            continue
        image = release / "images" / split / pid / "image.png"
        columns["image"].append({"bytes": image.read_bytes(), "path": None} if problem["image"] else None)
        for name in columns:
            if name != "image":
                columns[name].append(problem[name])
    return columns


def write_parquet(columns: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=feature_types()).to_parquet(str(path))
    return path


LMMS_README = """---
configs:
- config_name: ScienceQA-FULL
  data_files:
  - split: validation
    path: ScienceQA-FULL/validation-*
  - split: test
    path: ScienceQA-FULL/test-*
- config_name: ScienceQA-IMG
  data_files:
  - split: validation
    path: ScienceQA-IMG/validation-*
  - split: test
    path: ScienceQA-IMG/test-*
---
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The official release and its two HF copies (a local clone of each dataset repository)."""
    root = tmp_path_factory.mktemp("hfdata")
    release = write_official(root / "official")
    lmms = root / "lmms-lab--ScienceQA"
    for config, images_only in (("ScienceQA-IMG", True), ("ScienceQA-FULL", False)):
        for split in ("val", "test"):
            write_parquet(hf_rows(release, split, images_only),
                          lmms / config / f"{HF_SPLIT[split]}-00000-of-00001.parquet")
    (lmms / "README.md").write_text(LMMS_README)
    derek = root / "derek-thomas--ScienceQA"
    for split in ("train", "val", "test"):
        write_parquet(hf_rows(release, split, False), derek / "data" / f"{HF_SPLIT[split]}-00000-of-00001-0a1b.parquet")
    return {"release": release, "lmms": lmms, "derek": derek, "cache": root / "datasets-cache"}


def load(data, source, config=None, split=None):
    return load_hf_questions(source, config, split, cache_dir=data["cache"])


# -- prompts identical to the official release's ---------------------------------------------------------------------


CASES = [  # (layout, config, official split, HF split, images only)
    ("lmms", "ScienceQA-IMG", "test", "test", True),
    ("lmms", "ScienceQA-FULL", "test", "test", False),
    ("lmms", "ScienceQA-IMG", "val", "validation", True),
    ("derek", None, "test", "test", False),
    ("derek", None, "val", "validation", False),
    ("derek", None, "train", "train", False),
]


@pytest.mark.parametrize("layout, config, official_split, hf_split, images_only", CASES)
def test_prompts_labels_and_images_equal_the_official_release(data, tmp_path, layout, config, official_split,
                                                              hf_split, images_only):
    official = load_official_questions(data["release"], official_split)
    expected = [q for q in official.questions if q.image is not None or not images_only]
    hf = load(data, data[layout], config, hf_split)
    got = hf.questions.questions
    assert hf.questions.format == "hf" and hf.questions.split == hf_split and hf.questions.config == config
    assert [q.id for q in got] == [str(i) for i in range(len(expected))]  # no id column: the row index
    assert len(got) == len(expected) > 0 and not any(q.error for q in got)
    official_images = data["release"] / "images" / official_split
    write_images(hf, tmp_path)
    for mine, theirs in zip(got, expected):
        assert mine.text == theirs.text and mine.label == theirs.label
        assert (mine.image is None) == (theirs.image is None)
        for single_pred_prompt in (True, False):  # the full conversation prompts
            assert build_prompt(mine.text, mine.image is not None, single_pred_prompt) == \
                build_prompt(theirs.text, theirs.image is not None, single_pred_prompt)
        if mine.image is not None:  # the same file, bytes unchanged, the same pixels
            assert mine.image == f"{mine.id}/image.png"
            assert (tmp_path / mine.image).read_bytes() == (official_images / theirs.image).read_bytes()
            assert load_image(tmp_path, mine).tobytes() == load_image(official_images, theirs).tobytes()
    # A few texts spelled out, so that the comparison is not vacuous.
    if layout == "derek" and official_split == "test":
        assert got[0].text == "<image>\nContext: Look at the picture.\nWhich shape is red?\nA. circle\nB. square"
        assert got[2].text == "Context: Colours are words.\nWhich word is a colour?\nA. circle\nB. yellow"
        assert got[3].text.startswith("<image>\nHow many circles are there?\nA. one") and got[3].label == "A"
        assert got[4].text.startswith("<image>\nContext: Temperatures:\n30 °C and 10 °C\nWhich is warmer")


def test_one_parquet_file_a_folder_and_an_in_memory_dataset_give_the_same_questions_and_hash(data):
    folder = load(data, data["derek"], None, "test")
    file = next((data["derek"] / "data").glob("test-*.parquet"))
    one_file = load(data, file)  # the split comes from the file name
    assert one_file.questions.split == "test" and one_file.questions.path == str(file.resolve())
    in_memory = questions_from_dataset(datasets.Dataset.from_parquet(str(file)), source="memory", split="test")
    for other in (one_file, in_memory):
        assert other.questions.sha256 == folder.questions.sha256
        assert [(q.id, q.text, q.label, q.image) for q in other.questions.questions] == \
            [(q.id, q.text, q.label, q.image) for q in folder.questions.questions]
    identity = folder.questions.identity()
    assert identity["format"] == "hf" and identity["config"] is None and identity["num_questions_in_file"] == 7


def test_the_hash_covers_texts_answers_images_and_the_split(data, tmp_path):
    columns = hf_rows(data["release"], "test", False)
    base = load(data, write_parquet(columns, tmp_path / "a" / "test.parquet")).questions.sha256
    assert load(data, write_parquet(columns, tmp_path / "b" / "copy.parquet"), split="test").questions.sha256 == base
    assert load(data, tmp_path / "a" / "test.parquet", split=None).questions.sha256 == base
    assert load(data, tmp_path / "b" / "copy.parquet", split="validation").questions.sha256 != base
    changed = {name: list(values) for name, values in columns.items()}
    changed["answer"][0] = 0
    assert load(data, write_parquet(changed, tmp_path / "c" / "test.parquet")).questions.sha256 != base
    changed = {name: list(values) for name, values in columns.items()}
    changed["hint"][1] = "A new hint."
    assert load(data, write_parquet(changed, tmp_path / "d" / "test.parquet")).questions.sha256 != base
    changed = {name: list(values) for name, values in columns.items()}
    changed["image"][0] = {"bytes": columns["image"][1]["bytes"], "path": None}
    assert load(data, write_parquet(changed, tmp_path / "e" / "test.parquet")).questions.sha256 != base


def test_an_id_column_gives_the_ids(data, tmp_path):
    columns = hf_rows(data["release"], "test", True)
    columns["id"] = [f"q{i}" for i in range(len(columns["question"]))]
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features({**feature_types(),
                                                                              "id": datasets.Value("string")}))
    hf = questions_from_dataset(dataset, source="with-ids", split="test")
    assert [q.id for q in hf.questions.questions] == columns["id"]
    assert [q.image for q in hf.questions.questions] == [f"q{i}/image.png" for i in range(len(columns["id"]))]
    columns["id"][1] = "q0"
    with pytest.raises(DataError, match="'q0' appears twice"):
        questions_from_dataset(datasets.Dataset.from_dict(columns), source="dup", split="test")


# -- errors -----------------------------------------------------------------------------------------------------------


def test_a_missing_column_is_named_with_the_file(data, tmp_path):
    columns = hf_rows(data["release"], "test", False)
    del columns["hint"]
    path = tmp_path / "test.parquet"
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        load(data, path)
    message = str(info.value)
    assert "missing column 'hint'" in message and str(path.resolve()) in message
    assert "columns present: image, question, choices, answer, task" in message and "lmms-lab/ScienceQA" in message


def test_malformed_rows_name_the_file_the_row_and_the_field(data, tmp_path):
    columns = hf_rows(data["release"], "test", False)
    columns["answer"][1] = 7
    columns["choices"][2] = ["a", "b", "c", "d", "e", "f"]
    path = write_parquet(columns, tmp_path / "test.parquet")
    questions = load(data, path).questions.questions
    assert questions[0].error is None and questions[3].error is None
    assert questions[1].error == f"{path}: row 1: field 'answer' = 7 must be an index into the 3 choices"
    assert questions[2].error.startswith(f"{path}: row 2: field 'choices' must be a list of 2 to 5 strings")
    # An image cell with a path but no bytes is read from that path; an unreadable one is the row's error.
    columns["image"][3] = {"bytes": None, "path": str(tmp_path / "nowhere.png")}
    columns["image"][4] = {"bytes": None, "path": str(data["release"] / "images" / "test" / "105" / "image.png")}
    hf = questions_from_dataset(datasets.Dataset.from_dict(columns), source="cells", split="test")
    questions = hf.questions.questions
    assert questions[3].error.startswith("cells: row 3: field 'image' has no bytes and its path")
    assert questions[4].error is None and hf.images["4"] == Path(columns["image"][4]["path"]).read_bytes()


def test_loader_errors(data, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"Unknown split \"val\"\. Should be one of \['validation', 'test'\]|"
                                        r"Unknown split \"val\"\. Should be one of \['test', 'validation'\]"):
        load(data, data["lmms"], "ScienceQA-IMG", "val")
    with pytest.raises(DataError, match="'val' is called 'validation' in HF datasets"):
        load(data, data["derek"], None, "val")
    named = next((data["derek"] / "data").glob("validation-*.parquet"))
    with pytest.raises(DataError, match="--split 'test', but .* is named as split 'validation'"):
        load(data, named, split="test")
    with pytest.raises(DataError, match="--hf-config 'ScienceQA-IMG' selects files"):
        load(data, named, "ScienceQA-IMG")
    with pytest.raises(DataError, match="does not exist"):
        load(data, tmp_path / "nothing.parquet")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="expected a .parquet file"):
        load(data, tmp_path / "notes.txt")
    # A hub id that is not in the local cache: no download (offline), a clear message.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(DataError, match="HF dataset lmms-lab/ScienceQA \\(config ScienceQA-IMG, split test\\) cannot "
                                        "be loaded: .*local datasets cache when offline"):
        load(data, "lmms-lab/ScienceQA", "ScienceQA-IMG", "test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(DataError, match=r"needs the optional `datasets` package .* pip install -e '\.\[hf\]'"):
        load(data, data["lmms"], "ScienceQA-IMG", "test")


def test_a_hub_id_is_loaded_by_name_config_and_split(data, monkeypatch):
    """A hub id goes to `datasets.load_dataset(id, name=config, split=split)`, which reads the local cache (here the
    call is answered from a local copy: the hub is not reachable from tests)."""
    expected = load(data, data["lmms"], "ScienceQA-IMG", "test").questions.sha256
    calls = []
    real = datasets.load_dataset

    def from_cache(path, name=None, split=None, cache_dir=None, **kwargs):
        calls.append((path, name, split))
        return real(str(data["lmms"] / name), split=split, cache_dir=cache_dir)

    monkeypatch.setattr(datasets, "load_dataset", from_cache)
    hf = load(data, "lmms-lab/ScienceQA", "ScienceQA-IMG", None)
    assert calls == [("lmms-lab/ScienceQA", "ScienceQA-IMG", "test")]
    assert hf.questions.path == "lmms-lab/ScienceQA" and hf.questions.config == "ScienceQA-IMG"
    assert hf.questions.sha256 == expected and hf.questions.identity()["config"] == "ScienceQA-IMG"


# -- the commands -----------------------------------------------------------------------------------------------------


def test_flag_conflicts_and_dry_run(data, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(data["cache"]))
    parquet = next((data["derek"] / "data").glob("test-*.parquet"))
    base = ["--model-path", tiny_model_dir, "--output-dir", tmp_path / "out", "--no-progress"]
    assert cli(*base, "--hf-dataset", parquet, "--question-file", data["release"]) == 2
    assert "--hf-dataset replaces --question-file" in capsys.readouterr().err
    monkeypatch.setenv("FASTV_EMBEDDED", "1")  # it sets --question-file and --image-folder
    assert cli(*base, "--hf-dataset", parquet) == 2
    assert "FASTV_EMBEDDED=1 sets --question-file and --image-folder to the embedded data: unset it" in \
        capsys.readouterr().err
    monkeypatch.delenv("FASTV_EMBEDDED")
    assert cli(*base, "--hf-config", "ScienceQA-IMG", "--question-file", data["release"]) == 2
    assert "--hf-config apply only to --hf-dataset" in capsys.readouterr().err
    images = tmp_path / "images"
    assert cli(*base, "--hf-dataset", data["lmms"], "--hf-config", "ScienceQA-IMG", "--hf-image-dir", images,
               "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"questions: {data['lmms'].resolve()} (hf format, config ScienceQA-IMG, split test, 5 in file" in out
    assert f"images: {images} (5 questions with an image)" in out and not images.exists()


def test_eval_from_parquet_equals_eval_from_the_official_release(data, tiny_model_dir, tmp_path, monkeypatch,
                                                                  one_torch_thread):
    """The same problems from the official release and from a parquet file in derek-thomas's schema: the same prompts,
    token counts and outputs, question by question; the result header names the HF data."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(data["cache"]))
    parquet = next((data["derek"] / "data").glob("test-*.parquet"))
    common = ["--model-path", tiny_model_dir, "--single-pred-prompt", "--max-new-tokens", "3", "--no-progress",
              "--num-samples", "4"]
    assert cli(*common, "--question-file", data["release"], "--split", "test", "--output-dir", tmp_path / "off") == 0
    assert cli(*common, "--hf-dataset", parquet, "--hf-image-dir", tmp_path / "img", "--output-dir",
               tmp_path / "hf") == 0
    (official_header, official), = [read_jsonl(p) for p in (tmp_path / "off").glob("*.jsonl")]
    (header, samples), = [read_jsonl(p) for p in (tmp_path / "hf").glob("*.jsonl")]
    assert [s["id"] for s in samples] == ["0", "1", "2", "3"] and [s["id"] for s in official] == ["101", "102", "103",
                                                                                                   "104"]
    keys = ("prompt", "num_tokens", "num_image_tokens", "output", "prediction", "label")
    assert [[s[k] for k in keys] for s in samples] == [[s[k] for k in keys] for s in official]
    assert samples[2]["image"] is None and samples[0]["num_image_tokens"] > 0
    questions = header["questions"]
    assert questions["format"] == "hf" and questions["path"] == str(parquet.resolve()) and questions["split"] == "test"
    assert questions["sha256"] == load(data, parquet).questions.sha256 and questions["num_questions_in_file"] == 7
    assert header["image_folder"] == str((tmp_path / "img").resolve())
    # A re-run from the dataset's folder instead of the file resumes (the same identity): nothing is recomputed.
    assert cli(*common, "--hf-dataset", data["derek"], "--split", "test", "--hf-image-dir", tmp_path / "img",
               "--output-dir", tmp_path / "hf") == 0
    assert read_jsonl(next((tmp_path / "hf").glob("*.jsonl")))[1] == samples


def test_suite_script_runs_from_a_local_parquet(data, tmp_path):
    """The guide's suite (fastv-sweep, six configurations, then the comparison) with `-- --hf-dataset <parquet>`, on a
    tiny LLaVA with LLaVA-1.5's image geometry (576 image tokens)."""
    from fastv_advanced.tiny import save_tiny_llava

    model = tmp_path / "tiny-llava-576"
    save_tiny_llava(model, seed=0, image_size=336, patch_size=14)
    parquet = next((data["lmms"] / "ScienceQA-IMG").glob("test-*.parquet"))
    env = subprocess_env(PYTHON=sys.executable, NUM_SAMPLES="2", HF_DATASETS_OFFLINE="1",
                         HF_DATASETS_CACHE=str(data["cache"]), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("GPU", None)
    for name in ("QUESTION_FILE", "IMAGE_FOLDER", "HF_DATASET"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(SUITE), "--model-path", str(model), "--output-dir", str(tmp_path / "out"),
                           "--", "--hf-dataset", str(parquet), "--split", "test", "--max-new-tokens", "3",
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"questions: HF dataset {parquet}" in done.stdout
    assert "6 computed of 6 configurations" in done.stdout and "FastV Advanced 结果比较" in done.stdout
    results = sorted((tmp_path / "out").glob("scienceqa_results_*.json"))
    assert len(results) == 6
    for path in results:
        result = json.loads(path.read_text())
        assert result["total_samples"] == 2 and result["complete"]
        assert result["question_file"]["format"] == "hf"
    images = list((tmp_path / "xdg" / "fastv_advanced" / "hf_images").glob("*/*/image.png"))
    assert len(images) == 2  # the default image folder, the first two questions only

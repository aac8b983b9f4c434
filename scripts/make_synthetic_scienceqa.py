#!/usr/bin/env python
"""Regenerate the synthetic ScienceQA-style splits (see `fastv_advanced.synthetic` and docs/embedded_demo.md).

    python scripts/make_synthetic_scienceqa.py              # test split into data/scienceqa/, train split into
                                                            # outputs/synthetic_scienceqa_train/ (git-ignored)
    python scripts/make_synthetic_scienceqa.py --skip-train

Test split: `data/scienceqa/himap-inference-MCQ.json` and `data/scienceqa/images/test/<id>/image.png`, plus
`data/scienceqa/generation.json` recording the generator version, seeds and counts. The same seeds give the same
bytes. The training script does not need the train split on disk: it regenerates it in memory from its seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fastv_advanced import synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data" / "scienceqa"
DEFAULT_NUM_TEST = 300
DEFAULT_NUM_TRAIN = 12000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-seed", type=int, default=synthetic.TEST_SEED)
    parser.add_argument("--num-test", type=int, default=DEFAULT_NUM_TEST)
    parser.add_argument("--question-file", default=str(DATA / "himap-inference-MCQ.json"))
    parser.add_argument("--image-folder", default=str(DATA / "images" / "test"))
    parser.add_argument("--train-seed", type=int, default=synthetic.TRAIN_SEED)
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--train-dir", default=str(REPO_ROOT / "outputs" / "synthetic_scienceqa_train"))
    parser.add_argument("--skip-train", action="store_true", help="write only the test split")
    args = parser.parse_args(argv)

    test = synthetic.generate_split(args.test_seed, args.num_test, synthetic.TEST_ID_START)
    image_folder = Path(args.image_folder)
    if image_folder.exists():
        shutil.rmtree(image_folder)  # no stale images from a larger earlier split
    synthetic.write_split(test, args.question_file, image_folder)
    record = {
        "generator": "fastv_advanced.synthetic",
        "generator_version": synthetic.GENERATOR_VERSION,
        "command": "python scripts/make_synthetic_scienceqa.py",
        "test": {"seed": args.test_seed, "num_questions": args.num_test, "id_start": synthetic.TEST_ID_START,
                 "question_file": "himap-inference-MCQ.json", "image_folder": "images/test",
                 "chance_accuracy": round(synthetic.chance_accuracy(test), 4)},
        "train": {"seed": args.train_seed, "num_questions": args.num_train, "id_start": synthetic.TRAIN_ID_START,
                  "shipped": False},
    }
    Path(args.question_file).with_name("generation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"test: {len(test)} questions -> {args.question_file}, images -> {image_folder}")

    if not args.skip_train:
        train = synthetic.generate_split(args.train_seed, args.num_train, synthetic.TRAIN_ID_START)
        train_dir = Path(args.train_dir)
        synthetic.write_split(train, train_dir / "train.json", train_dir / "images")
        print(f"train: {len(train)} questions -> {train_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

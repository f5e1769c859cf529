"""Write a CSV source that holds out a patient-grouped test split of the Kaggle training folder.

    python bench/kaggle_holdout.py ../shared/data/chest_xray_224 data/kaggle-holdout.csv [--fraction 0.15]

The official Kaggle test split is not in ../shared, so RESULTS.md's "held-out" figures come from
patients of the training folder that training never saw (make_shards then carves val from the rest).
Such a split comes from the same pool as train: it flatters like validation does, unlike the official
test split, whose images differ. The CSV's paths are absolute, so make_shards needs
--allow-outside-paths to read it.
"""

from __future__ import annotations

import argparse
import csv
import os
import random

from pneumo_dist import sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kaggle_root")
    parser.add_argument("out_csv")
    parser.add_argument("--fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = os.path.abspath(args.kaggle_root)
    images = [image for image in sources.list_kaggle(root).images if image.split == "train"]
    rng = random.Random(args.seed)
    held_out = set()
    for label in (0, 1):  # per class, so both classes keep their share
        patients = sorted({image.patient_id for image in images if image.label == label})
        held_out |= set(rng.sample(patients, round(args.fraction * len(patients))))
    with open(args.out_csv, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "patient_id", "split"])
        for image in images:
            split = "test" if image.patient_id in held_out else "train"
            writer.writerow([os.path.join(root, image.source), image.label, image.patient_id, split])
    print(f"{sum(image.patient_id in held_out for image in images)} of {len(images)} images held out")


if __name__ == "__main__":
    main()

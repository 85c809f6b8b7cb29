"""Write `alexnet_jax/resources/imagenet_names.txt`: one line per ILSVRC-2012 class, in tfds's `imagenet2012` label
order, `<WordNet id>\t<lemmas, comma-separated>` (e.g. `n01440764\ttench, Tinca tinca`).

ILSVRC's class ids are WordNet 3.0 noun synsets (`n` + the 8-digit offset in `data.noun`); the names come from
WordNet itself, Debian's `wordnet-base` package (`apt-get install wordnet-base`, /usr/share/wordnet/data.noun).
`predict` prints the first lemma beside the id. Usage: python scripts/make_imagenet_names.py [DATA_NOUN]
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "alexnet_jax", "resources", "imagenet_names.txt")


def lemmas(data_noun: str) -> dict[str, list[str]]:
    """WordNet id -> its lemmas, from a WordNet 3.0 data.noun file."""
    out = {}
    with open(data_noun, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split()
            count = int(fields[3], 16)
            out["n" + fields[0]] = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_noun", nargs="?", default="/usr/share/wordnet/data.noun",
                        help="WordNet 3.0's data.noun (Debian: apt-get install wordnet-base)")
    data_noun = parser.parse_args().data_noun
    if not os.path.isfile(data_noun):
        sys.exit(f"make_imagenet_names.py: error: {data_noun} not found: install WordNet 3.0 (Debian: apt-get "
                 "install wordnet-base) or give its data.noun")
    import tensorflow_datasets as tfds

    names = lemmas(data_noun)
    with open(os.fspath(tfds.core.tfds_path("datasets/imagenet2012/labels.txt"))) as f:
        wnids = f.read().split()
    missing = [w for w in wnids if w not in names]
    if missing:
        sys.exit(f"{len(missing)} ids not in {data_noun} (not WordNet 3.0?): {missing[:5]}")
    with open(OUT, "w") as f:
        for w in wnids:
            f.write(f"{w}\t{', '.join(names[w])}\n")
    print(f"wrote {len(wnids)} classes to {OUT}")


if __name__ == "__main__":
    main()

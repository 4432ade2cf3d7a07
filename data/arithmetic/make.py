"""A small dataset with answers that can be checked: additions of two numbers below 100, as
conversations and as prompt/completion pairs, with a held-out test set of other sums.

    python data/arithmetic/make.py          # writes the .jsonl files beside this script

train.jsonl / test.jsonl:            {"messages": [{"role": "user", "content": "What is 23 + 58?"},
                                                   {"role": "assistant", "content": "81"}]}
train_pairs.jsonl / test_pairs.jsonl: {"prompt": "23+58=", "completion": "81\\n"}
sub_pairs.jsonl:                      {"prompt": "81-58=", "completion": "23\\n"}  (500, to mix in: records.md)

The 10,000 sums are shuffled with a fixed seed: the first 200 are the test set, the next 4,000 the
training set, so no test question is trained on. The same files come out every time.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST, TRAIN, SUB = 200, 4000, 500


def write(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")  # complete or absent: renamed into place once written
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    sums = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1337).shuffle(sums)
    for name, part in (("test", sums[:TEST]), ("train", sums[TEST:TEST + TRAIN])):
        write(HERE / f"{name}.jsonl", [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                                     {"role": "assistant", "content": str(a + b)}]} for a, b in part])
        # A char model has no end-of-text token: the newline ends each answer.
        write(HERE / f"{name}_pairs.jsonl", [{"prompt": f"{a}+{b}=", "completion": f"{a + b}\n"} for a, b in part])
        print(f"wrote {HERE / name}.jsonl and {name}_pairs.jsonl: {len(part):,} sums")
    differences = [(a + b, b) for a, b in sums[-SUB:]]  # sums not in train or test, turned around
    write(HERE / "sub_pairs.jsonl", [{"prompt": f"{a}-{b}=", "completion": f"{a - b}\n"} for a, b in differences])
    print(f"wrote {HERE / 'sub_pairs.jsonl'}: {SUB:,} differences")


if __name__ == "__main__":
    main()

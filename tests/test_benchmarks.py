"""The benchmark harness's data preparation (benchmarks/): the same split in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

SPLIT = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import sentiment_sst2
words = ["good", "bad", "film", "plot", "cast", "score", "scene", "story"]
rows = [(" ".join(words[(i + k) % 8] for k in range(6 + i % 3)) + f" {i}", i % 2) for i in range(400)]
rows += [(sentence.rsplit(" ", 2)[0], label) for sentence, label in rows[:50]]  # sub-phrases
train, test = sentiment_sst2.sentence_level_split(rows, held_out=20, seed=3)
print(json.dumps([train, test]))
'''


def test_sst2_sentence_split_is_the_same_in_every_process():
    """Many held-out candidates share a length; their order must not come from string hashing,
    which Python salts per process (PYTHONHASHSEED)."""
    splits = []
    for hash_seed in ("1", "2", "3"):
        result = subprocess.run([sys.executable, "-c", SPLIT, str(ROOT / "benchmarks")], capture_output=True,
                                text=True, check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        splits.append(json.loads(result.stdout))
    assert splits[0] == splits[1] == splits[2]
    train, test = splits[0]
    assert len(test) == 20 and not {sentence for sentence, _ in test} & {sentence for sentence, _ in train}

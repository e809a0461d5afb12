"""ner_finetuning.py: data reading, tag schemes, sub-token alignment, windows, per-word decoding,
metrics, prediction spans, end-to-end runs on tiny models, and the error paths."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
from conftest import (DATA, assert_clean_error, assert_saved_then_evaluated_once, build_tiny_encoder, run_script,
                      training_log, write_rows)

import ner_finetuning as ner

SCRIPT = "ner_finetuning.py"
FAST = ("--epochs", "1", "--batch-size", "16", "--learning-rate", "1e-3")


def ner_texts() -> list[str]:
    texts = []
    for split in ("train", "validation", "test"):
        texts += [" ".join(s.tokens) for s in ner.read_conll(str(DATA / "ner" / f"{split}.conll"), "--train-file")]
    return texts


@pytest.fixture(scope="module")
def ner_encoder(tmp_path_factory) -> Path:
    """A 2-layer BERT whose small WordPiece vocabulary (trained on the NER sample) splits many words."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-ner-bert"), texts=ner_texts())


@pytest.fixture(scope="module")
def tokenizer(ner_encoder):
    return ner.load_word_tokenizer(str(ner_encoder))


@pytest.fixture(scope="module")
def trained(ner_encoder, tmp_path_factory):
    """One real run on the embedded sample data, shared by the tests that only read its outputs."""
    output_dir = tmp_path_factory.mktemp("ner-run")
    result = run_script(SCRIPT, "--model-name", ner_encoder, "--output-dir", output_dir, *FAST, "--epochs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, json.loads((output_dir / "metrics.json").read_text()), result


def write_conll(path: Path, sentences: list[list[tuple[str, ...]]], docstart: str | None = None, sep: str = "\t") -> Path:
    lines = []
    for sentence in sentences:
        if docstart:
            lines += [docstart, ""]
        lines += [sep.join(fields) for fields in sentence] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def namespace(**overrides) -> argparse.Namespace:
    defaults = dict(label_list=None, validation_split=0.1, seed=42, max_train_samples=None, max_eval_samples=None,
                    tokens_column=None, tags_column=None)
    return argparse.Namespace(**{**defaults, **overrides})


# ---- reading CoNLL and JSON data ------------------------------------------------------------------


def test_conll_four_columns_docstart_blank_lines_and_mixed_separators(tmp_path):
    text = ("-DOCSTART- -X- -X- O\n\n"
            "EU NNP B-NP I-ORG\nrejects\tVBZ  B-VP\tO\nGerman JJ B-NP I-MISC  \n\n\n\n"
            "-DOCSTART- -X- -X- O\n"
            "Peter NNP B-NP I-PER\r\nBlackburn NNP I-NP I-PER\n")
    (tmp_path / "four.txt").write_text(text)
    sentences = ner.read_conll(str(tmp_path / "four.txt"), "--train-file")
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sentences] == [["I-ORG", "O", "I-MISC"], ["I-PER", "I-PER"]]
    assert [s.where for s in sentences] == ["line 3", "line 10"]


def embedded_sentence_count(split: str) -> int:
    """Sentences in an embedded CoNLL file, counted as blocks between blank lines."""
    return len([block for block in (DATA / "ner" / f"{split}.conll").read_text(encoding="utf-8").split("\n\n")
                if block.strip()])


def test_conll_two_columns_and_the_embedded_sample():
    sentences = ner.read_conll(str(DATA / "ner" / "train.conll"), "--train-file")
    assert len(sentences) == embedded_sentence_count("train")
    assert sentences[0].tokens[:3] == ["Rolls-Royce", "won", "a"] and sentences[0].tags[:2] == ["B-ORG", "O"]
    assert all(len(s.tokens) == len(s.tags) for s in sentences)


def test_language_prefix_is_stripped(tmp_path, capsys):
    file = write_conll(tmp_path / "train", [[("en:Anders", "B-PER"), ("en:Lindström", "I-PER"), ("en::", "O")]])
    assert ner.read_conll(str(file), "--train-file")[0].tokens == ["Anders", "Lindström", ":"]
    assert "'en:'" in capsys.readouterr().out
    mixed = write_conll(tmp_path / "mixed", [[("en:Anders", "B-PER"), ("Paris", "B-LOC")]])
    assert ner.read_conll(str(mixed), "--train-file")[0].tokens == ["en:Anders", "Paris"]


def test_jsonl_with_detected_columns_and_integer_ids(tmp_path):
    rows = [{"id": 1, "words": ["Angela", "Merkel", "visited", "Paris"], "ner_tags": [1, 2, 0, 3]},
            {"id": 2, "words": [], "ner_tags": []},
            {"id": 3, "words": ["Berlin"], "ner_tags": ["3"]}]
    file = write_rows(tmp_path / "train.jsonl", rows)
    sentences = ner.read_json_sentences(str(file), "--train-file", None, None)
    assert [s.tokens for s in sentences] == [["Angela", "Merkel", "visited", "Paris"], ["Berlin"]]
    split = ner.Split(sentences, "--train-file train.jsonl")
    ner.name_tags(split, ner.parse_label_list("O,B-PER,I-PER,B-LOC,I-LOC"))
    assert [s.tags for s in split.sentences] == [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC"]]


def test_label_list_from_a_file(tmp_path):
    (tmp_path / "labels.txt").write_text("O\nB-PER\nI-PER\n\n")
    assert ner.parse_label_list(str(tmp_path / "labels.txt")) == ["O", "B-PER", "I-PER"]


# ---- tag schemes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tags, scheme, iob2", [
    (["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"], "IOB1", ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]),
    (["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"], "IOB2", ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]),
    (["B-PER", "E-PER", "O", "S-LOC", "B-ORG", "I-ORG", "E-ORG"], "IOBES",
     ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "I-ORG", "I-ORG"]),
    (["U-PER", "B-LOC", "L-LOC", "U-LOC"], "BILOU", ["B-PER", "B-LOC", "I-LOC", "B-LOC"]),
    (["O", "O"], "no entities", ["O", "O"]),
])
def test_scheme_detection_and_conversion_to_iob2(tags, scheme, iob2):
    assert ner.detect_scheme([tags]) == scheme
    assert ner.to_iob2(tags) == iob2
    assert ner.to_iob2(iob2) == iob2, "converting IOB2 again changes nothing"


def test_prepare_splits_converts_iob1_keeps_unseen_types_and_builds_labels(tmp_path, capsys):
    train = ner.Split([ner.Sentence(["Peter", "Blackburn", "in", "Bonn"], ["I-PER", "I-PER", "O", "I-LOC"], f"line {i}")
                       for i in range(4)], "--train-file t")
    validation = ner.Split([ner.Sentence(["EU", "says", "Bonn"], ["I-ORG", "O", "I-LOC"], "line 1")], "--validation-file v")
    splits = {"train": train, "validation": validation}
    labels = ner.prepare_splits(namespace(), splits)
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert train.scheme == "IOB1" and train.sentences[0].tags == ["B-PER", "I-PER", "O", "B-LOC"]
    assert validation.sentences[0].tags == ["B-ORG", "O", "B-LOC"], "unseen types stay in the gold tags"
    assert "never seen in training: ORG (1 entities)" in capsys.readouterr().out


# ---- sub-token alignment and windows ------------------------------------------------------------------


def split_words(tokenizer, words):
    """Words the tiny vocabulary cuts into several sub-tokens."""
    return [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) > 1]


def test_labels_on_the_first_sub_token_or_on_all(tokenizer):
    words = ["Aroha", "Whaanga", "teaches", "in", "Rotorua"]
    assert split_words(tokenizer, words), "the test needs words with several sub-tokens"
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    tags = [[3, 4, 0, 0, 1]]
    continuation = {1: 2, 3: 4}
    (first,), windows, _ = ner.encode(tokenizer, [words], 64, tags)
    (every,), _, _ = ner.encode(tokenizer, [words], 64, tags, label_all_tokens=True, continuation=continuation)
    word_ids = windows[0].word_ids
    assert word_ids[0] is None and word_ids[-1] is None
    previous = None
    for position, word in enumerate(word_ids):
        if word is None:
            assert first["labels"][position] == every["labels"][position] == -100
        elif word != previous:
            assert first["labels"][position] == every["labels"][position] == tags[0][word]
        else:
            assert first["labels"][position] == -100
            expected = continuation.get(tags[0][word], tags[0][word])
            assert every["labels"][position] == expected, "continuations of B-X are labelled I-X"
        previous = word
    assert labels[every["labels"][word_ids.index(0) + 1]] == "I-PER"


def test_long_sentence_is_split_into_windows_that_keep_every_word(tokenizer):
    words = " ".join(ner_texts()[:3]).split()
    tags = [[i % 3 for i in range(len(words))]]
    features, windows, split_count = ner.encode(tokenizer, [words, ["short", "one"]], 16, tags + [[0, 0]])
    assert split_count == 1
    long_windows = [w for w in windows if w.sentence == 0]
    assert len(long_windows) > 2
    covered = []
    for feature, window in zip(features, windows):
        assert len(feature["input_ids"]) <= 16
        if window.sentence == 0:
            indices = sorted({w for w in window.word_ids if w is not None})
            assert indices == list(range(len(indices))), "each window holds whole consecutive words"
            covered += [window.start + i for i in indices]
            first_labels = [feature["labels"][window.word_ids.index(i)] for i in indices]
            assert first_labels == [tags[0][window.start + i] for i in indices]
    assert covered == list(range(len(words))), "every word lands in exactly one window, in order"


def test_evaluation_splits_are_ordered_by_length_and_decode_the_same(tokenizer):
    """Evaluation windows are sorted by length (less padding); decoding gold-label logits gives back
    every sentence's gold tags in file order, long sentences split into windows included."""
    import argparse

    import numpy as np

    sentences = [ner.Sentence(text.split(), [], f"line {i}") for i, text in enumerate(ner_texts()[:12])]
    sentences.append(ner.Sentence(" ".join(ner_texts()[:3]).split(), [], "line 99"))  # split into windows
    for sentence in sentences:
        sentence.tags = [LABELS[(i * 7 + len(sentence.tokens)) % 2 * 3] for i in range(len(sentence.tokens))]
    args = argparse.Namespace(max_length=16, label_all_tokens=False)
    plain = ner.encode_split(tokenizer, ner.Split(sentences, "test"), LABELS, args)
    ordered = ner.encode_split(tokenizer, ner.Split(sentences, "test"), LABELS, args, by_length=True)
    lengths = [len(feature["input_ids"]) for feature in ordered.features]
    assert lengths == sorted(lengths) and lengths != [len(f["input_ids"]) for f in plain.features]
    assert ordered.split_count == plain.split_count > 0
    width = max(lengths)
    logits = np.array([[one_hot(label) if label != -100 else [0.0] * len(LABELS) for label in feature["labels"]]
                       + [[0.0] * len(LABELS)] * (width - len(feature["labels"])) for feature in ordered.features])
    tags, _ = ner.decode(logits, ordered.windows, ordered.lengths, LABELS)
    assert tags == [s.tags for s in sentences] == ordered.gold


def test_a_word_longer_than_the_window_is_kept(tokenizer):
    words = ["Paris", "zqxjkvwzqxjkvwzqxjkvw", "France"]
    assert len(tokenizer(words[1], add_special_tokens=False)["input_ids"]) > 8
    _, windows, split_count = ner.encode(tokenizer, [words], 10)
    assert split_count == 1
    seen = sorted(w.start + i for w in windows for i in {i for i in w.word_ids if i is not None})
    assert seen == [0, 1, 2]


def test_words_without_sub_tokens_get_the_unknown_token(tokenizer):
    words = ["Paris", "\u200b", "France"]
    features, windows, _ = ner.encode(tokenizer, [words], 32, [[1, 0, 1]])
    assert sorted({i for i in windows[0].word_ids if i is not None}) == [0, 1, 2]
    position = windows[0].word_ids.index(1)
    assert features[0]["input_ids"][position] == tokenizer.unk_token_id and features[0]["labels"][position] == 0
    # each such word takes its place in the window budget: 2 sub-tokens per window here
    features, windows, split_count = ner.encode(tokenizer, [["\u200b", "\u200b", "\u200b"]], 4)
    assert split_count == 1 and [w.start for w in windows] == [0, 2]
    assert all(f["input_ids"][1:-1] == [tokenizer.unk_token_id] * (len(f["input_ids"]) - 2) for f in features)


# ---- per-word decoding ---------------------------------------------------------------------------------


LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def one_hot(index: int, strength: float = 5.0) -> list[float]:
    return [strength if i == index else 0.0 for i in range(len(LABELS))]


def test_decoding_reads_the_first_sub_token_and_stitches_windows():
    import numpy as np

    # sentence 0 = words 0..3 in two windows; sentence 1 = one word. Word 1 has 2 sub-tokens whose
    # continuation votes O: it must be ignored. Padding rows (-100) must be ignored too.
    windows = [ner.Window(0, 0, [None, 0, 1, 1, None]), ner.Window(1, 0, [None, 0, None]),
               ner.Window(0, 2, [None, 0, 1, None])]
    pad = [-100.0] * len(LABELS)
    logits = np.array([
        [pad, one_hot(3), one_hot(4), one_hot(0, 9), pad],
        [pad, one_hot(1), pad, pad, pad],
        [pad, one_hot(0), one_hot(1), pad, pad],
    ])
    tags, scores = ner.decode(logits, windows, [4, 1], LABELS)
    assert tags == [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC"]]
    assert all(0.9 < s <= 1 for sentence in scores for s in sentence)


def test_decoding_never_starts_an_entity_with_i():
    import numpy as np

    windows = [ner.Window(0, 0, [None, 0, 1, 2, None])]
    # argmax would read O I-PER I-LOC: not IOB2; the constrained decoder repairs it.
    logits = np.array([[[0] * 5, one_hot(0), [0, 0, 0, 2.0, 3.0], [0, 2.0, 3.0, 0, 0], [0] * 5]])
    tags, _ = ner.decode(logits, windows, [3], LABELS)
    assert tags == [["O", "B-PER", "B-LOC"]]


# ---- metrics ---------------------------------------------------------------------------------------------


def test_metrics_match_a_hand_computed_seqeval_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "I-PER"]]
    # Entities: gold PER(0-1) LOC(3) | ORG(0) PER(2); predicted PER(0-1) ORG(3) | ORG(0) and an
    # I-PER that strict IOB2 matching does not accept as an entity.
    # TP = 2 (PER, ORG in sentence 2); predicted 3, gold 4 -> P = 2/3, R = 2/4, F1 = 4/7.
    metrics = ner.ner_metrics(gold, predicted)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(1 / 2)
    assert metrics["f1"] == pytest.approx(4 / 7)
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["words"] == 7
    assert metrics["per_type"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1},
        "PER": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
    }


def test_metrics_without_entities_are_zero_and_silence_only_numpys_averaging_notes(monkeypatch):
    """Gold without entities: zero scores and no numpy notes; any other warning seqeval gives reaches the user."""
    import warnings

    import seqeval.metrics

    gold, predicted = [["O", "O"], ["O"]], [["O", "O"], ["O"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = ner.ner_metrics(gold, predicted)
    assert (metrics["precision"], metrics["recall"], metrics["f1"], metrics["accuracy"]) == (0.0, 0.0, 0.0, 1.0)

    report = seqeval.metrics.classification_report

    def report_with_a_note(*args, **kwargs):
        warnings.warn("a note the user can act on", UserWarning)
        return report(*args, **kwargs)

    monkeypatch.setattr(seqeval.metrics, "classification_report", report_with_a_note)
    with pytest.warns(UserWarning, match="a note the user can act on"):
        ner.ner_metrics(gold, predicted)


# ---- prediction on free text -----------------------------------------------------------------------------


def test_free_text_words_and_entity_spans():
    text = "Angela Merkel's visit to the U.S. cost $3.5m, said @ap_news."
    words = ner.split_words(text)
    assert [w for w, _, _ in words] == ["Angela", "Merkel", "'s", "visit", "to", "the", "U.S.", "cost", "$", "3.5",
                                        "m", ",", "said", "@ap_news", "."]
    assert all(text[start:end] == word for word, start, end in words)
    tags = ["B-PER", "I-PER", "O", "O", "O", "O", "B-LOC", "O", "O", "O", "O", "O", "O", "B-ORG", "O"]
    scores = [0.9, 0.7] + [0.5] * 13
    entities = ner.group_entities(words, tags, scores, text)
    assert entities == [
        {"type": "PER", "start": 0, "end": 13, "score": pytest.approx(0.8), "text": "Angela Merkel"},
        {"type": "LOC", "start": 29, "end": 33, "score": 0.5, "text": "U.S."},
        {"type": "ORG", "start": 51, "end": 59, "score": 0.5, "text": "@ap_news"},
    ]


def forced_model(trained_dir: Path, target: Path, tag: str) -> Path:
    """A copy of the trained model whose head always prefers `tag` (deterministic predictions)."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(trained_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[model.config.label2id[tag]] = 3.0
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(trained_dir).save_pretrained(target)
    return target


def test_predict_prints_entities_with_character_spans(trained, tmp_path):
    output_dir, metrics, _ = trained
    model_dir = forced_model(output_dir, tmp_path / "forced", "B-LOC")
    lines = ["  Paris, France", "", "Tim Cook"]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    text = "Angela Merkel met Tim Cook in Paris."
    result = run_script(SCRIPT, "--output-dir", model_dir, "--predict", text, "--predict", f"@{tmp_path / 'lines.txt'}")
    assert result.returncode == 0, result.stderr
    blocks, current = {}, None
    for line in result.stdout.splitlines():
        if line.startswith("  ") and current is not None and re.match(r"\s+LOC\s+\d", line):
            kind, start, end, score, entity = line.split(maxsplit=4)
            blocks[current].append((kind, int(start), int(end), float(score), entity))
        else:
            current = line
            blocks[current] = []
    assert list(blocks) == [text, "  Paris, France", "Tim Cook"]
    for line, entities in blocks.items():
        expected = ner.split_words(line)
        assert [(e[1], e[2]) for e in entities] == [(start, end) for _, start, end in expected]
        assert all(line[start:end] == entity for _, start, end, _, entity in entities)
        probability = math.exp(3) / (math.exp(3) + len(metrics["labels"]) - 1)
        assert all(e[0] == "LOC" and e[3] == pytest.approx(probability, abs=1e-3) for e in entities)
    assert blocks["  Paris, France"][0][1:3] == (2, 7)


def test_predicted_entities_span_several_words(trained, tmp_path):
    from transformers import AutoModelForTokenClassification

    output_dir, _, _ = trained
    model_dir = forced_model(output_dir, tmp_path / "forced", "I-PER")
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    text = "Angela Merkel met Tim Cook in Paris."
    (entities,) = ner.predict_entities(model, ner.load_word_tokenizer(str(model_dir)), [text], 128, 8)
    # I-PER everywhere is not IOB2: the decoder starts with B-PER, then continues the entity.
    assert [(e["type"], e["start"], e["end"], e["text"]) for e in entities] == [("PER", 0, len(text), text)]
    # Windows: with room for 3 sub-tokens per window, the text is cut, and every word is still tagged.
    (windowed,) = ner.predict_entities(model, ner.load_word_tokenizer(str(model_dir)), [text], 5, 8)
    assert windowed[0]["start"] == 0 and windowed[-1]["end"] == len(text)


# ---- end to end on the embedded data --------------------------------------------------------------------


def test_embedded_run_writes_every_output(trained):
    output_dir, _, result = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "run_config.json",
                 "training_log.jsonl", "training_curves.png"):
        assert (output_dir / name).is_file(), name
    assert not (output_dir / "checkpoints").exists()
    assert "embedded sample data" in result.stdout
    assert "train IOB2, validation IOB2, test IOB2" in result.stdout
    assert re.search(rf"test\s+{embedded_sentence_count('test')}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+", result.stdout), \
        "the final table"
    assert "per entity type" in result.stdout


def test_metrics_schema(trained, ner_encoder):
    _, metrics, _ = trained
    assert metrics["task"] == "token-classification" and metrics["method"] == "full"
    assert metrics["model"] == str(ner_encoder)
    assert metrics["labels"] == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert metrics["scheme"]["detected"] == {"train": "IOB2", "validation": "IOB2", "test": "IOB2"}
    assert metrics["scheme"]["converted_to"] == "IOB2"
    for key in ("runtime_s", "samples_per_s", "sentences_per_s", "tokens_per_s", "peak_rss_mb"):
        assert metrics["train"][key] > 0
    # Token classification: FastDropout and the CPU attention; no first-token layer (every position
    # is read) and no embedding-gradient buffer (it does not pay on NER's longer steps).
    assert {"fast_dropout", "cpu_attention"} <= set(metrics["train"]["speedups"])
    assert not {"first_token_last_layer", "embedding_gradient_buffer"} & set(metrics["train"]["speedups"])
    assert metrics["train"]["examples"] == embedded_sentence_count("train")
    words = {split: sum(len(s.tokens) for s in ner.read_conll(str(DATA / "ner" / f"{split}.conll"), "x"))
             for split in ("validation", "test")}
    for split in ("validation", "test"):
        block = metrics[split]
        assert block["examples"] == embedded_sentence_count(split) and block["words"] == words[split]
        for key in ("precision", "recall", "f1", "accuracy"):
            assert 0 <= block[key] <= 1
        assert set(block["per_type"]) == {"LOC", "MISC", "ORG", "PER"}
        assert all(set(v) == {"precision", "recall", "f1", "support"} for v in block["per_type"].values())


def test_training_log_has_an_evaluation_per_epoch(trained):
    output_dir, _, _ = trained
    records = training_log(output_dir)
    assert [round(r["epoch"]) for r in records if "eval_f1" in r] == [1, 2]


def test_one_epoch_run_saves_its_model_then_evaluates_it(ner_encoder, tmp_path):
    result = run_script(SCRIPT, "--model-name", ner_encoder, "--output-dir", tmp_path / "out", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert_saved_then_evaluated_once(tmp_path / "out", "f1", metrics["validation"]["f1"])


def test_saved_model_loads_with_plain_transformers_and_pipeline(trained):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    output_dir, metrics, _ = trained
    model = AutoModelForTokenClassification.from_pretrained(output_dir)
    assert [model.config.id2label[i] for i in range(len(metrics["labels"]))] == metrics["labels"]
    tagger = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(output_dir),
                      aggregation_strategy="simple")
    assert isinstance(tagger("Angela Merkel met Tim Cook in Paris."), list)


def test_existing_model_is_not_overwritten(trained, ner_encoder):
    output_dir, _, _ = trained
    result = run_script(SCRIPT, "--model-name", ner_encoder, "--output-dir", output_dir, *FAST)
    assert_clean_error(result, "already holds a trained model")


def iob2_to_iob1(tags: list[str]) -> list[str]:
    """B- only where an entity directly follows one of the same type, I- elsewhere."""
    return [tag if tag.startswith("B-") and i and tags[i - 1][2:] == tag[2:] else tag.replace("B-", "I-")
            for i, tag in enumerate(tags)]


def iob2_to_iobes(tags: list[str]) -> list[str]:
    converted = []
    for i, tag in enumerate(tags):
        last = i + 1 == len(tags) or not tags[i + 1].startswith("I-")
        converted.append(tag if tag == "O" else {"B": "SB", "I": "EI"}[tag[0]][0 if last else 1] + tag[1:])
    return converted


def test_iob1_conll_training_with_unseen_types_and_long_sentences(ner_encoder, tmp_path):
    """4-column IOB1 CoNLL for training, IOBES JSONL for validation with a type that training
    lacks, and a --max-length small enough that sentences are split into windows."""
    train_sentences = []
    for sentence in ner.read_conll(str(DATA / "ner" / "train.conll"), "x")[:120]:
        tags = iob2_to_iob1(["O" if tag.endswith("MISC") else tag for tag in sentence.tags])
        train_sentences.append([(token, "NNP", "B-NP", tag) for token, tag in zip(sentence.tokens, tags)])
    train_file = write_conll(tmp_path / "train.txt", train_sentences, docstart="-DOCSTART- -X- -X- O", sep=" ")
    validation = [{"tokens": sentence.tokens, "tags": iob2_to_iobes(sentence.tags)}
                  for sentence in ner.read_conll(str(DATA / "ner" / "validation.conll"), "x")[:30]]
    validation_file = write_rows(tmp_path / "validation.jsonl", validation)
    words = sum(len(row["tokens"]) for row in validation)
    misc = sum(tag.startswith(("B-MISC", "S-MISC")) for row in validation for tag in row["tags"])
    result = run_script(SCRIPT, "--model-name", ner_encoder, "--output-dir", tmp_path / "out", *FAST,
                        "--train-file", train_file, "--validation-file", validation_file, "--max-length", "12",
                        "--label-all-tokens")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tags: train IOB1, validation IOBES (converted to IOB2" in result.stdout
    assert "never seen in training: MISC" in result.stdout
    assert re.search(r"note: \d+ train sentence\(s\) longer than --max-length 12 tokens were split", result.stdout)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["validation"]["words"] == words, "every word of a split sentence is scored exactly once"
    assert metrics["validation"]["split_sentences"] > 0
    assert metrics["validation"]["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": misc}
    assert "B-MISC" not in metrics["labels"]
    assert metrics["scheme"]["label_all_tokens"] is True


# ---- bad input: one clear line, non-zero exit, no traceback ------------------------------------------------


def run_on(tmp_path, train_file, *extra):
    return run_script(SCRIPT, "--model-name", "unused-model-name", "--train-file", train_file,
                      "--output-dir", tmp_path / "out", *extra)


def test_file_with_no_sentences(tmp_path):
    (tmp_path / "empty.conll").write_text("-DOCSTART- -X- -X- O\n\n\n")
    assert_clean_error(run_on(tmp_path, tmp_path / "empty.conll"), "no sentences")


def test_token_without_a_tag(tmp_path):
    (tmp_path / "t.conll").write_text("Paris B-LOC\nis O\nnice\n")
    assert_clean_error(run_on(tmp_path, tmp_path / "t.conll"), "line 3", "token but no tag", "'nice'")


def test_inconsistent_column_counts(tmp_path):
    (tmp_path / "t.conll").write_text("Paris NNP B-LOC\nis VBZ O\n\nnice O\n")
    assert_clean_error(run_on(tmp_path, tmp_path / "t.conll"), "line 4 has 2 columns but line 1 has 3")


def test_unknown_tag_shape(tmp_path):
    (tmp_path / "t.conll").write_text("Paris B-LOC\n\nAngela X-PER\nMerkel I-PER\n")
    assert_clean_error(run_on(tmp_path, tmp_path / "t.conll"), "line 3", "unknown tag shape 'X-PER'")


def test_integer_tags_need_a_label_list(tmp_path):
    file = write_rows(tmp_path / "t.jsonl", [{"tokens": ["Paris"], "ner_tags": [5]}])
    assert_clean_error(run_on(tmp_path, file), "integer ids", "--label-list")
    assert_clean_error(run_on(tmp_path, file, "--label-list", "O,B-LOC,I-LOC"), "tag id 5 is outside --label-list")


def test_json_tokens_and_tags_of_different_lengths(tmp_path):
    file = write_rows(tmp_path / "t.json", [{"tokens": ["Paris", "is"], "tags": ["B-LOC"]}])
    assert_clean_error(run_on(tmp_path, file), "row 1 has 2 tokens but 1 tags")


def test_json_columns_that_cannot_be_detected(tmp_path):
    file = write_rows(tmp_path / "t.jsonl", [{"a": ["Paris"], "b": ["B-LOC"]}])
    assert_clean_error(run_on(tmp_path, file), "a, b", "--tokens-column")


def test_training_data_without_entities(tmp_path):
    (tmp_path / "t.conll").write_text("nothing O\nhere O\n")
    assert_clean_error(run_on(tmp_path, tmp_path / "t.conll"), "no entities")


def test_missing_file_and_unsupported_type(tmp_path):
    assert_clean_error(run_on(tmp_path, tmp_path / "nope.conll"), "--train-file", "no such file")
    (tmp_path / "t.csv").write_text("tokens,tags\n")
    assert_clean_error(run_on(tmp_path, tmp_path / "t.csv"), "unsupported file type '.csv'")


def test_tokenizer_without_a_fast_implementation(tmp_path):
    from transformers import EsmConfig, EsmTokenizer

    model_dir = tmp_path / "esm"
    model_dir.mkdir()
    vocab = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<mask>"]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    EsmTokenizer(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    EsmConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, pad_token_id=1).save_pretrained(model_dir)
    result = run_script(SCRIPT, "--model-name", model_dir, "--output-dir", tmp_path / "out")
    assert_clean_error(result, "no fast implementation", "word ids")


def test_predict_without_a_model(tmp_path):
    assert_clean_error(run_script(SCRIPT, "--output-dir", tmp_path, "--predict", "Paris"), "holds no trained model")


def test_hub_dataset_when_the_hub_is_unreachable(tmp_path):
    result = run_script(SCRIPT, "--dataset", "conll2003", "--output-dir", tmp_path / "out")
    assert_clean_error(result, "--dataset conll2003")

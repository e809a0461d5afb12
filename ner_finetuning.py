#!/usr/bin/env python
"""Full fine-tuning of a pretrained encoder for named-entity recognition (token classification).

    python ner_finetuning.py                                          # embedded sample data
    python ner_finetuning.py --train-file train.conll --validation-file dev.conll \\
        --test-file test.conll --epochs 3 --output-dir ./ner
    python ner_finetuning.py --output-dir ./ner --predict "Angela Merkel met Tim Cook in Paris."

Data: CoNLL-style files (one token per line, the tag in the last column, spaces or tabs between
columns, a blank line between sentences, -DOCSTART- lines ignored), JSON/JSONL rows with a list of
tokens and a list of tags, or a hub dataset. IOB1, IOB2 (BIO), IOBES and BILOU tags are detected
and converted to IOB2, which the model is trained on; integer tag ids need --label-list.

Steps: load and check the data -> split sentences longer than --max-length into windows of whole
words -> tokenize once, labelling the first sub-token of every word -> train (evaluating entity F1
every epoch, keeping the best checkpoint) -> decode per word, score with seqeval (strict IOB2
entity matching) on validation and test -> save model, metrics and logs -> report.
This file holds what is particular to NER (reading and converting tags, word windows, decoding,
entity scores); the run itself, shared with sentiment_finetuning.py, is encoders.run_encoder_task().
Works offline: when the hub is unreachable the bundled MiniLM encoder is used (see README).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import common
import encoders
import reports
from common import UserError

DEFAULT_MODEL = "bert-base-cased"
DEFAULT_DATA = common.DATA_DIR / "ner"
TOKEN_COLUMNS = ("tokens", "words", "token", "word", "sentence", "text")
TAG_COLUMNS = ("ner_tags", "tags", "labels", "ner", "ner_labels", "tag", "label", "entities")
JSON_EXTENSIONS = (".json", ".jsonl")
# Anything else is read as CoNLL text (files are often named .conll, .txt, .iob, .bio, .tsv, or
# have no extension at all); these are certainly not.
NOT_CONLL_EXTENSIONS = (".csv", ".xlsx", ".xls", ".parquet", ".arrow", ".gz", ".zip", ".bz2", ".xz",
                        ".pdf", ".pkl", ".pt", ".safetensors")
DOCSTART = "-DOCSTART-"
TAG_SHAPE = re.compile(r"^(?:O|[BIESLU]-\S+)$")
LANGUAGE_PREFIX = re.compile(r"^([a-z]{2,3}:)\S")
SCORING = "seqeval, strict entity matching, IOB2"
# Words of free text for --predict: URLs, @mentions/#hashtags, abbreviations (U.S.), numbers with
# separators (3.5, 1,000), words (with inner hyphens), English clitics ('s, 're, n't is split as
# do|n't would not be) and any other single non-space character.
WORD_PATTERN = re.compile(r"https?://\S+?(?=[.,;:!?)\]]*(?:\s|$))|[@#]\w+|(?:[^\W\d_]\.){2,}|\d+(?:[.,:]\d+)+"
                          r"|\w+(?:-\w+)*|['’](?:s|re|ve|ll|d|m|t)\b|[^\w\s]", re.IGNORECASE)


def build_parser(description: str = __doc__, learning_rate: float = 5e-5, fallback_learning_rate: float = 2e-4,
                 output_dir: str = "./results/ner") -> argparse.ArgumentParser:
    """The NER flags; lora_finetuning.py --task ner builds on the same parser."""
    parser = common.ArgumentParser(description=description, formatter_class=common.HelpFormatter)
    common.add_model_args(parser, DEFAULT_MODEL)
    data = common.add_data_args(parser)
    helps = {
        "--train-file": "Training data: a CoNLL-style file (token ... tag per line, blank line between "
                        "sentences) or .json/.jsonl rows with a tokens list and a tags list. Default: "
                        "the embedded sample data under data/ner.",
        "--validation-file": "Validation data, same formats.",
        "--test-file": "Test data, same formats; evaluated once at the end.",
        "--validation-split": "Fraction of the training sentences held out (seeded, at random) for "
                              "validation when no validation data is given.",
        "--max-train-samples": "Train on a seeded random subset of this many sentences.",
        "--max-eval-samples": "Evaluate on at most this many validation/test sentences.",
    }
    for action in data._group_actions:
        action.help = helps.get(action.option_strings[0], action.help)
    columns = parser.add_argument_group("columns and tags")
    columns.add_argument("--tokens-column", help=f"JSON/hub column with the list of tokens (auto: one of {', '.join(TOKEN_COLUMNS[:4])}, ...).")
    columns.add_argument("--tags-column", help=f"JSON/hub column with the list of tags (auto: one of {', '.join(TAG_COLUMNS[:4])}, ...).")
    columns.add_argument("--label-list", metavar="NAMES",
                         help="Tag names for integer tag ids, in id order: comma-separated "
                              "(O,B-PER,I-PER,...) or a file with one name per line.")
    # No warm-up: on WNUT-17 (bundled MiniLM, lr 2e-4) one epoch reached test entity F1 0.320 without
    # it and 0.210 / 0.226 (two seeds) with 10%; after three epochs both reach ~0.43.
    training = encoders.add_training_args(parser, learning_rate=learning_rate, fallback_learning_rate=fallback_learning_rate,
                                        warmup_ratio=0.0)
    training.add_argument(
        "--label-all-tokens", action="store_true",
        help="Train on every sub-token of a word (continuations of a B- word are labelled I-) instead "
             "of its first sub-token only. Predictions are always read from the first sub-token.")
    training.add_argument(
        "--metric-for-best-model", choices=("f1", "accuracy", "loss"), default="f1",
        help="Validation metric that picks the checkpoint kept at the end (f1: entity F1).")
    common.add_precision_args(parser)
    common.add_output_args(parser, output_dir)
    predict = parser.add_argument_group("prediction (uses the model saved in --output-dir)")
    predict.add_argument("--predict", action="append", metavar="TEXT",
                         help="Print the entities found in this text (type, character span "
                              "[start, end), score, text) and exit (repeatable).")
    predict.add_argument("--predict-file", dest="predict", action="append", type="@{}".format,
                         help=argparse.SUPPRESS)  # the older spelling of --predict @FILE
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    encoders.check_encoder_args(parser, args)
    return args


# --------------------------------------------------------------------------------------------
# Reading data
# --------------------------------------------------------------------------------------------


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[Any]  # str, or int ids until they are named
    where: str  # "line 12" / "row 3": where the sentence starts, for messages


@dataclass
class Split:
    """The sentences of one split, where they came from, and the tag scheme they were written in."""

    sentences: list[Sentence]
    source: str
    scheme: str = ""


def read_conll(path: str, flag: str) -> list[Sentence]:
    """Read a CoNLL-style file: token first, tag last, any run of spaces/tabs between columns."""
    file = Path(path).expanduser()
    if file.is_file() and file.suffix.lower() in NOT_CONLL_EXTENSIONS:
        raise UserError(f"{flag} {path}: unsupported file type '{file.suffix}'; use a CoNLL-style text "
                        "file (token ... tag per line) or .json/.jsonl.")
    file = common.check_input_file(path, flag, [file.suffix.lower()])
    text = common.read_text_file(file, flag)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    columns = first_columns_line = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip(" \t\r\n")
        fields = re.split(r"[ \t]+", line) if line else []
        if not fields or fields[0] == DOCSTART:
            if tokens:
                sentences.append(Sentence(tokens, tags, f"line {start}"))
            tokens, tags = [], []
            continue
        if len(fields) == 1:
            raise UserError(f"{flag} {file}: line {number} has a token but no tag ({fields[0]!r}); each "
                            "line needs the token first and its tag last, separated by spaces or tabs.")
        if columns is None:
            columns, first_columns_line = len(fields), number
        elif len(fields) != columns:
            raise UserError(f"{flag} {file}: line {number} has {len(fields)} columns but line "
                            f"{first_columns_line} has {columns}; every token line needs the same columns.")
        if not tokens:
            start = number
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        sentences.append(Sentence(tokens, tags, f"line {start}"))
    if not sentences:
        raise UserError(f"{flag} {file}: no sentences found; expected one 'token ... tag' line per token "
                        "and a blank line between sentences.")
    for sentence in sentences:
        sentence.tags = [normalise_tag(tag) for tag in sentence.tags]
    strip_language_prefix(sentences, flag, file)
    return sentences


def strip_language_prefix(sentences: list[Sentence], flag: str, file: Path) -> None:
    """WikiANN-style files prefix every token with its language ('en:Paris'): remove it."""
    first = LANGUAGE_PREFIX.match(sentences[0].tokens[0])
    if not first:
        return
    prefix = first.group(1)
    if all(token.startswith(prefix) and len(token) > len(prefix) for s in sentences for token in s.tokens):
        for sentence in sentences:
            sentence.tokens = [token[len(prefix):] for token in sentence.tokens]
        print(f"note: {flag} {file.name}: every token starts with '{prefix}' (a language prefix, as in "
              "WikiANN); removed it.")


def read_json_sentences(path: str, flag: str, tokens_column: str | None, tags_column: str | None) -> list[Sentence]:
    rows = common.read_table(path, flag)
    columns = list(rows[0].keys())
    source = f"{flag} {path}"
    token_key = common.detect_column(columns, tokens_column, TOKEN_COLUMNS, "tokens", "--tokens-column", source)
    tag_key = common.detect_column(columns, tags_column, TAG_COLUMNS, "tags", "--tags-column", source)
    if token_key == tag_key:
        raise UserError(f"{source}: the tokens and tags columns are both '{token_key}'; set --tokens-column "
                        "and --tags-column.")
    return rows_to_sentences(rows, token_key, tag_key, source)


def rows_to_sentences(rows: Sequence[dict], token_key: str, tag_key: str, source: str) -> list[Sentence]:
    sentences, empty = [], 0
    for number, row in enumerate(rows, start=1):
        if token_key not in row or tag_key not in row:
            missing = token_key if token_key not in row else tag_key
            raise UserError(f"{source}: row {number} has no '{missing}' field.")
        tokens, tags = row[token_key], row[tag_key]
        if not isinstance(tokens, (list, tuple)) or not isinstance(tags, (list, tuple)):
            bad = token_key if not isinstance(tokens, (list, tuple)) else tag_key
            raise UserError(f"{source}: row {number}: '{bad}' must be a list (one entry per token), "
                            f"got {type(row[bad]).__name__}.")
        if len(tokens) != len(tags):
            raise UserError(f"{source}: row {number} has {len(tokens)} tokens but {len(tags)} tags.")
        if not tokens:
            empty += 1
            continue
        tokens = [str(token) for token in tokens]
        if any(not token.strip() for token in tokens):
            raise UserError(f"{source}: row {number} has an empty token.")
        sentences.append(Sentence(tokens, [normalise_tag(tag) for tag in tags], f"row {number}"))
    if empty:
        print(f"note: {source}: skipped {empty} row(s) with no tokens.")
    if not sentences:
        raise UserError(f"{source}: no sentences found (every row has an empty token list).")
    return sentences


def normalise_tag(tag: Any) -> Any:
    """Integer ids stay integers (also '3' or 3.0); anything else is a tag name."""
    if isinstance(tag, bool):
        return str(tag)
    if isinstance(tag, int):
        return tag
    if isinstance(tag, float) and tag.is_integer():
        return int(tag)
    text = str(tag).strip()
    return int(text) if text.isascii() and text.isdigit() else text


def read_sentences(path: str, flag: str, args: argparse.Namespace) -> list[Sentence]:
    if Path(path).suffix.lower() in JSON_EXTENSIONS:
        return read_json_sentences(path, flag, args.tokens_column, args.tags_column)
    return read_conll(path, flag)


def load_splits(args: argparse.Namespace) -> tuple[dict[str, Split], str]:
    """Return {'train', 'validation'?, 'test'?} splits of raw sentences and a description of the source."""
    if args.dataset:
        return load_hub_splits(args), f"hub dataset {args.dataset}"
    if not args.train_file and (args.validation_file or args.test_file):
        raise UserError("--validation-file/--test-file need --train-file as well.")
    train_file = args.train_file or str(DEFAULT_DATA / "train.conll")
    files = {"train": (train_file, "--train-file"),
             "validation": (args.validation_file or (None if args.train_file else str(DEFAULT_DATA / "validation.conll")),
                            "--validation-file"),
             "test": (args.test_file or (None if args.train_file else str(DEFAULT_DATA / "test.conll")), "--test-file")}
    splits = {split: Split(read_sentences(path, flag, args), f"{flag} {path}")
              for split, (path, flag) in files.items() if path}
    return splits, train_file if args.train_file else f"embedded sample data ({DEFAULT_DATA})"


def load_hub_splits(args: argparse.Namespace) -> dict[str, Split]:
    hub = common.load_hub_dataset(args.dataset, args.dataset_config)
    if "train" not in hub:
        raise UserError(f"--dataset {args.dataset} has no 'train' split (has: {', '.join(hub)}).")
    source = f"--dataset {args.dataset}"
    columns = list(hub["train"].column_names)
    token_key = common.detect_column(columns, args.tokens_column, TOKEN_COLUMNS, "tokens", "--tokens-column", source)
    tag_key = common.detect_column(columns, args.tags_column, TAG_COLUMNS, "tags", "--tags-column", source)
    feature = hub["train"].features.get(tag_key)
    names = getattr(getattr(feature, "feature", None), "names", None)
    if names and not args.label_list:
        args.label_list = ",".join(names)
    splits = {}
    for split, aliases in {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}.items():
        found = next((alias for alias in aliases if alias in hub), None)
        if found:
            splits[split] = Split(rows_to_sentences(list(hub[found]), token_key, tag_key, f"{source} [{found}]"),
                                  f"{source} [{found}]")
    return splits


# --------------------------------------------------------------------------------------------
# Tags: names, shapes, schemes
# --------------------------------------------------------------------------------------------


def parse_label_list(value: str) -> list[str]:
    file = Path(value).expanduser()
    if "," not in value and file.is_file():
        names = [line.strip() for line in common.read_text_file(file, "--label-list").splitlines() if line.strip()]
    else:
        names = [name.strip() for name in value.split(",")]
    if not names or any(not name for name in names):
        raise UserError(f"--label-list {value}: expected comma-separated tag names such as O,B-PER,I-PER.")
    for name in names:
        if not TAG_SHAPE.match(name):
            raise UserError(f"--label-list: '{name}' is not a tag; expected O or a prefix B-, I-, E-, S-, "
                            "L- or U- followed by the entity type.")
    return names


def name_tags(split: Split, label_names: list[str] | None) -> None:
    """Turn integer tag ids into names (via --label-list) and check every tag's shape."""
    kinds = {type(tag) for sentence in split.sentences for tag in sentence.tags}
    if kinds == {str, int}:
        raise UserError(f"{split.source}: the tags mix integer ids and tag names; use one kind.")
    if int in kinds:
        if not label_names:
            raise UserError(f"{split.source}: the tags are integer ids; name them with --label-list "
                            "(for example --label-list O,B-PER,I-PER,B-LOC,I-LOC).")
        for sentence in split.sentences:
            for tag in sentence.tags:
                if not 0 <= tag < len(label_names):
                    raise UserError(f"{split.source}: {sentence.where}: tag id {tag} is outside --label-list "
                                    f"(which names ids 0 to {len(label_names) - 1}).")
            sentence.tags = [label_names[tag] for tag in sentence.tags]
        return
    for sentence in split.sentences:
        for offset, tag in enumerate(sentence.tags):
            if not TAG_SHAPE.match(tag):
                where = sentence.where
                if where.startswith("line "):  # point at the exact line of a CoNLL file
                    where = f"line {int(where.split()[1]) + offset}"
                raise UserError(f"{split.source}: {where}: unknown tag shape '{tag}'; expected O or "
                                "B-TYPE / I-TYPE (IOB1, IOB2), E-TYPE / S-TYPE (IOBES) or L-TYPE / U-TYPE (BILOU).")


def detect_scheme(sequences: Sequence[Sequence[str]]) -> str:
    """'IOB1', 'IOB2', 'IOBES', 'BILOU', or 'no entities'."""
    prefixes = {tag[0] for tags in sequences for tag in tags if tag != "O"}
    if not prefixes:
        return "no entities"
    if prefixes & {"L", "U"}:
        return "BILOU"
    if prefixes & {"E", "S"}:
        return "IOBES"
    for tags in sequences:
        previous = "O"
        for tag in tags:
            if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
                return "IOB1"  # a chunk that starts with I-: only IOB1 does that
            previous = tag
    return "IOB2"


def to_iob2(tags: Sequence[str]) -> list[str]:
    """Convert IOB1, IOB2, IOBES or BILOU tags to IOB2 (lossless; IOB2 input is returned unchanged).

    A chunk starts at B-/S-/U-, or at an I-/E-/L- that does not continue an open chunk of the same
    type (IOB1 starts chunks with I-); it stays open after B-/I- and closes after E-/S-/L-/U-.
    """
    converted, open_type = [], None
    for tag in tags:
        if tag == "O":
            converted.append("O")
            open_type = None
            continue
        prefix, kind = tag[0], tag[2:]
        continues = prefix in "IEL" and open_type == kind
        converted.append(("I-" if continues else "B-") + kind)
        open_type = kind if prefix in "BI" else None
    return converted


def entity_types(sequences: Sequence[Sequence[str]]) -> set[str]:
    return {tag[2:] for tags in sequences for tag in tags if tag != "O"}


def prepare_splits(args: argparse.Namespace, splits: dict[str, Split]) -> list[str]:
    """Name, check and convert the tags of every split to IOB2; hold out validation; subsample.

    Returns the label names (O, then B-/I- for each entity type of the training data).
    """
    label_names = parse_label_list(args.label_list) if args.label_list else None
    for split in splits.values():
        name_tags(split, label_names)
        split.scheme = detect_scheme([s.tags for s in split.sentences])
        for sentence in split.sentences:
            sentence.tags = to_iob2(sentence.tags)
    train_types = entity_types([s.tags for s in splits["train"].sentences])
    if not train_types:
        raise UserError(f"{splits['train'].source}: the training data has no entities (every tag is O).")
    labels = ["O"] + [f"{prefix}-{kind}" for kind in sorted(train_types) for prefix in ("B", "I")]

    if "validation" not in splits:
        train, validation = split_validation(splits["train"].sentences, args.validation_split, common.DATA_SEED)
        splits["train"].sentences = train
        splits["validation"] = Split(validation, f"{len(validation)} sentences held out of the training data",
                                     splits["train"].scheme)
        print(f"validation: held out {len(validation)} of the training sentences "
              f"(--validation-split {args.validation_split}, seed {common.DATA_SEED}).")
    splits["train"].sentences = common.seeded_subset(splits["train"].sentences, args.max_train_samples, common.DATA_SEED)
    for name in ("validation", "test"):
        if name in splits:
            splits[name].sentences = common.seeded_subset(splits[name].sentences, args.max_eval_samples, common.DATA_SEED)
            unseen = entity_types([s.tags for s in splits[name].sentences]) - train_types
            if unseen:
                count = sum(1 for s in splits[name].sentences for tag in s.tags if tag[2:] in unseen and tag[0] == "B")
                print(f"warning: {name} data has entity type(s) never seen in training: {', '.join(sorted(unseen))} "
                      f"({count} entities); the model cannot predict them, so they are scored as missed.")
    if not entity_types([s.tags for s in splits["train"].sentences]):
        raise UserError("after subsampling, the training data has no entities; raise --max-train-samples.")
    return labels


def split_validation(sentences: list[Sentence], fraction: float, seed: int) -> tuple[list[Sentence], list[Sentence]]:
    n_validation = max(1, round(len(sentences) * fraction))
    if len(sentences) - n_validation < 2:
        raise UserError(f"only {len(sentences)} training sentences: too few to hold out a validation set; "
                        "add data or pass --validation-file.")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_validation])
    return ([s for i, s in enumerate(sentences) if i not in held], [s for i, s in enumerate(sentences) if i in held])


# --------------------------------------------------------------------------------------------
# Tokenization: windows of whole words, labels on sub-tokens
# --------------------------------------------------------------------------------------------


@dataclass
class Window:
    """One model input: words [start, start + len) of sentence `sentence`, and each sub-token's word."""

    sentence: int
    start: int
    word_ids: list[int | None]  # per sub-token: index of the word within the window, None for specials


def load_word_tokenizer(model: common.ResolvedModel | str, name: str | None = None):
    """A fast tokenizer (word ids are needed to align tags with sub-tokens)."""
    from transformers import AutoTokenizer

    path = model.path if isinstance(model, common.ResolvedModel) else model
    name = name or (model.name if isinstance(model, common.ResolvedModel) else model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common.pretrained_kwargs())
        if needs_prefix_space(tokenizer):
            tokenizer = AutoTokenizer.from_pretrained(path, add_prefix_space=True, **common.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the tokenizer of '{name}': {common.first_line(error)}") from None
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer of '{name}' ({type(tokenizer).__name__}) has no fast implementation; "
                        "token classification needs one to map sub-tokens back to words (word ids). "
                        "Choose a model with a tokenizer.json / fast tokenizer.")
    tokenizer.padding_side = "right"  # sub-token positions are counted from the start of each window
    return tokenizer


def needs_prefix_space(tokenizer) -> bool:
    """Byte-level BPE (RoBERTa, GPT-2) must add a space before each pre-split word, or a word
    tokenizes differently from the same word inside running text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.dumps(json.loads(backend.to_str()).get("pre_tokenizer") or {})
    return '"ByteLevel"' in spec and '"add_prefix_space": false' in spec


def make_windows(tokenizer, sentences: Sequence[Sequence[str]], max_length: int) -> tuple[list[list[str]], list[tuple[int, int]], int]:
    """Split each sentence into consecutive windows of whole words that fit `max_length` sub-tokens.

    Returns the windows' words, (sentence index, first word) per window, and how many sentences
    were split. A word that on its own exceeds the budget gets a window to itself and is cut, which
    keeps its first sub-token: every word is still trained on and predicted. Words the tokenizer
    turns into nothing (zero-width or control characters) are replaced by its unknown token, so
    that every word has a sub-token to carry its tag.
    """
    budget = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    unknown = tokenizer.unk_token
    encoded = tokenizer([list(words) for words in sentences], is_split_into_words=True, add_special_tokens=False)
    windows, places, split_count = [], [], 0
    for index, words in enumerate(sentences):
        counts = [0] * len(words)
        for word in encoded.word_ids(index):
            if word is not None:
                counts[word] += 1
        if unknown is not None and 0 in counts:
            words = [unknown if count == 0 else word for word, count in zip(words, counts)]
            counts = [max(count, 1) for count in counts]
        start, used, pieces = 0, 0, 0
        for position, count in enumerate(counts):
            if position > start and used + count > budget:
                windows.append(list(words[start:position]))
                places.append((index, start))
                start, used, pieces = position, 0, pieces + 1
            used += count
        windows.append(list(words[start:]))
        places.append((index, start))
        split_count += pieces > 0
    return windows, places, split_count


def encode(tokenizer, sentences: Sequence[Sequence[str]], max_length: int, tag_ids: Sequence[Sequence[int]] | None = None,
           label_all_tokens: bool = False, continuation: dict[int, int] | None = None) -> tuple[list[dict], list[Window], int]:
    """Tokenize sentences into model inputs (windows), with labels when `tag_ids` is given.

    Labels: the first sub-token of a word carries the word's tag id; the other sub-tokens carry -100
    (ignored), or with `label_all_tokens` the tag id mapped through `continuation` (B-X -> I-X).
    Tag id -100 (an entity type unknown to the model) is ignored by the loss.
    """
    window_words, places, split_count = make_windows(tokenizer, sentences, max_length)
    encoded = tokenizer(window_words, is_split_into_words=True, truncation=True, max_length=max_length)
    features, windows = [], []
    for index, (sentence, start) in enumerate(places):
        word_ids = encoded.word_ids(index)
        feature = {key: values[index] for key, values in encoded.items()}
        if tag_ids is not None:
            tags = tag_ids[sentence][start:start + len(window_words[index])]
            labels, previous = [], None
            for word in word_ids:
                if word is None:
                    labels.append(-100)
                elif word != previous:
                    labels.append(tags[word])
                elif label_all_tokens and tags[word] != -100:
                    labels.append((continuation or {}).get(tags[word], tags[word]))
                else:
                    labels.append(-100)
                previous = word
            feature["labels"] = labels
        features.append(feature)
        windows.append(Window(sentence, start, list(word_ids)))
    return features, windows, split_count


# --------------------------------------------------------------------------------------------
# Decoding per word and scoring
# --------------------------------------------------------------------------------------------


def allowed_transitions(label_names: Sequence[str]):
    """IOB2 constraints: I-X only after B-X or I-X (never first). Returns (start, transition) log-masks."""
    import numpy as np

    blocked = -1e9
    size = len(label_names)
    start = np.zeros(size)
    transition = np.zeros((size, size))
    for j, tag in enumerate(label_names):
        if tag.startswith("I-"):
            start[j] = blocked
            for i, previous in enumerate(label_names):
                if previous[2:] != tag[2:] or previous == "O":
                    transition[i, j] = blocked
    return start, transition


def viterbi(log_probs, start, transition) -> list[int]:
    """Most likely tag sequence whose every transition is allowed (IOB2 well-formed)."""
    import numpy as np

    score = log_probs[0] + start
    back = []
    for row in log_probs[1:]:
        total = score[:, None] + transition
        best = total.argmax(0)
        back.append(best)
        score = total[best, np.arange(len(best))] + row
    path = [int(score.argmax())]
    for best in reversed(back):
        path.append(int(best[path[-1]]))
    return path[::-1]


def word_log_probs(logits, windows: Sequence[Window], lengths: Sequence[int], outside: int = 0):
    """Per sentence, an (n_words, n_labels) array of log-probabilities read from each word's first
    sub-token; windows of one sentence are stitched back together, so each word appears once.
    A word with no sub-token (never happens after make_windows) is forced to `outside` (O)."""
    import numpy as np

    n_labels = logits[0].shape[-1]
    forced = np.full(n_labels, -1e9)
    forced[outside] = 0.0
    result = [np.tile(forced, (length, 1)) for length in lengths]
    for window, row in zip(windows, logits):
        row = np.asarray(row, dtype=np.float64)
        seen = set()
        for position, word in enumerate(window.word_ids):
            if word is None or word in seen:
                continue
            seen.add(word)
            values = row[position]
            result[window.sentence][window.start + word] = values - np.logaddexp.reduce(values)
    return result


def decode(logits, windows: Sequence[Window], lengths: Sequence[int], label_names: Sequence[str]):
    """Per-word IOB2 tags (constrained Viterbi over the first sub-token's scores) and the
    probability of each chosen tag."""
    import numpy as np

    start, transition = allowed_transitions(label_names)
    tags, scores = [], []
    for matrix in word_log_probs(logits, windows, lengths, outside=list(label_names).index("O")):
        if len(matrix) == 0:
            tags.append([]), scores.append([])
            continue
        path = viterbi(matrix, start, transition)
        tags.append([label_names[i] for i in path])
        scores.append([float(np.exp(matrix[i, j])) for i, j in enumerate(path)])
    return tags, scores


def ner_metrics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity precision/recall/F1 (seqeval, strict IOB2), per entity type, and per-word accuracy."""
    import warnings

    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    words = sum(len(tags) for tags in gold)
    correct = sum(g == p for gold_tags, predicted_tags in zip(gold, predicted) for g, p in zip(gold_tags, predicted_tags))
    with warnings.catch_warnings():  # numpy's notes on averaging no entities, which the zero scores already say
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="invalid value encountered in scalar divide", category=RuntimeWarning)
        report = classification_report([list(t) for t in gold], [list(t) for t in predicted], mode="strict",
                                        scheme=IOB2, output_dict=True, zero_division=0)
    overall = report.pop("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    for key in ("macro avg", "weighted avg"):
        report.pop(key, None)
    return {
        "precision": float(overall["precision"]), "recall": float(overall["recall"]),
        "f1": float(overall["f1-score"]), "accuracy": correct / words if words else 0.0,
        "per_type": {kind: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                            "f1": float(v["f1-score"]), "support": int(v["support"])}
                     for kind, v in sorted(report.items())},
        "words": words,
    }


# --------------------------------------------------------------------------------------------
# Model, training, evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A split ready for the model: inputs, windows, and the gold tags per word."""

    features: list[dict]
    windows: list[Window]
    gold: list[list[str]]
    split_count: int

    @property
    def lengths(self) -> list[int]:
        return [len(tags) for tags in self.gold]


def encode_split(tokenizer, split: Split, label_names: list[str], args: argparse.Namespace,
                 by_length: bool = False) -> Encoded:
    """Encode a split; `by_length` orders its windows by length (for evaluation: batches of similar
    lengths carry little padding, and each window keeps its sentence, so decoding is unaffected)."""
    index = {name: i for i, name in enumerate(label_names)}
    continuation = {index[name]: index["I-" + name[2:]] for name in label_names if name.startswith("B-")}
    tag_ids = [[index.get(tag, -100) for tag in s.tags] for s in split.sentences]
    features, windows, split_count = encode(tokenizer, [s.tokens for s in split.sentences], args.max_length,
                                            tag_ids, args.label_all_tokens, continuation)
    if by_length:
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        features, windows = [features[i] for i in order], [windows[i] for i in order]
    return Encoded(features, windows, [list(s.tags) for s in split.sentences], split_count)


def trainer_metrics(validation: Encoded, label_names: list[str]):
    """The validation metrics the Trainer logs and picks the best checkpoint by: per word, decoded."""
    def compute_metrics(prediction):
        tags, _ = decode(prediction.predictions, validation.windows, validation.lengths, label_names)
        metrics = ner_metrics(validation.gold, tags)
        return {key: metrics[key] for key in ("precision", "recall", "f1", "accuracy")}
    return compute_metrics


def evaluate(trainer, encoded: Encoded, label_names: list[str]) -> dict[str, Any]:
    """Metrics of the trained model on a split, per word."""
    trainer.compute_metrics = None  # it decodes the validation windows; this split has its own
    prediction = trainer.predict(encoded.features)
    tags, _ = decode(prediction.predictions, encoded.windows, encoded.lengths, label_names)
    metrics = ner_metrics(encoded.gold, tags)
    metrics["loss"] = float(prediction.metrics.get("test_loss", float("nan")))
    metrics["examples"] = len(encoded.gold)
    metrics["windows"] = len(encoded.windows)
    metrics["split_sentences"] = encoded.split_count
    return metrics


def counts(train: Encoded, epochs: float, seconds: float) -> dict[str, Any]:
    sentences, windows = len(train.gold), len(train.features)
    return {"examples": sentences, "windows": windows, "samples_per_s": round(windows * epochs / seconds, 2),
            "sentences_per_s": round(sentences * epochs / seconds, 2)}


# --------------------------------------------------------------------------------------------
# Prediction with a saved model
# --------------------------------------------------------------------------------------------


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Words of free text with their character spans [start, end)."""
    return [(match.group(), match.start(), match.end()) for match in WORD_PATTERN.finditer(text)]


def group_entities(words: Sequence[tuple[str, int, int]], tags: Sequence[str], scores: Sequence[float],
                   text: str) -> list[dict[str, Any]]:
    """Turn per-word IOB2 tags into entities: type, character span, text and mean word score."""
    entities: list[dict[str, Any]] = []
    current = None
    for (word, start, end), tag, score in zip(words, tags, scores):
        if tag.startswith("I-") and current is not None and current["type"] == tag[2:]:
            current["end"] = end
            current["scores"].append(score)
            continue
        current = None
        if tag != "O":
            current = {"type": tag[2:], "start": start, "end": end, "scores": [score]}
            entities.append(current)
    for entity in entities:
        entity["score"] = sum(entity["scores"]) / len(entity["scores"])
        entity["text"] = text[entity["start"]:entity["end"]]
        del entity["scores"]
    return entities


def predict_entities(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> list[list[dict[str, Any]]]:
    import torch

    label_names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    if "O" not in label_names or not all(name == "O" or re.match(r"^[BI]-\S+$", name) for name in label_names):
        raise UserError(f"the saved model's labels ({', '.join(label_names[:6])}) are not IOB2 tags; "
                        "was it trained by this script?")
    words = [split_words(text) for text in texts]
    present = [i for i, w in enumerate(words) if w]
    features, windows, _ = encode(tokenizer, [[w for w, _, _ in words[i]] for i in present], max_length)
    logits = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = tokenizer.pad(features[start:start + batch_size], return_tensors="pt")
            output = model(**{k: v.to(model.device) for k, v in batch.items()
                              if k in ("input_ids", "attention_mask", "token_type_ids")})
            mask = batch["attention_mask"].bool()
            logits += [row[keep].float().numpy() for row, keep in zip(output.logits.cpu(), mask)]
    tags, scores = decode(logits, windows, [len(words[i]) for i in present], label_names) if features else ([], [])
    results: list[list[dict[str, Any]]] = [[] for _ in texts]
    for i, sentence_tags, sentence_scores in zip(present, tags, scores):
        results[i] = group_entities(words[i], sentence_tags, sentence_scores, texts[i])
    return results


def read_predict_texts(args: argparse.Namespace) -> list[str]:
    texts = common.read_texts(args.predict or [], "--predict", (".txt", ".text"))
    if not texts:
        raise UserError("nothing to tag: --predict was empty (or its @FILE had no lines).")
    return texts


def print_entities(texts: Sequence[str], results: Sequence[Sequence[dict[str, Any]]]) -> None:
    for text, entities in zip(texts, results):
        print(text)
        if not entities:
            print("  (no entities)")
        width = max((len(e["type"]) for e in entities), default=0)
        for e in entities:
            print(f"  {e['type']:<{width}}  {e['start']:>4}  {e['end']:>4}  {e['score']:.3f}  {e['text']}")


def predict(args: argparse.Namespace) -> None:
    texts = read_predict_texts(args)
    model_dir = Path(args.output_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--output-dir {args.output_dir} holds no trained model; train one first "
                        "(run without --predict) or point --output-dir at it.")
    common.quiet_libraries()
    import transformers
    from transformers import AutoModelForTokenClassification

    transformers.utils.logging.disable_progress_bar()

    tokenizer = load_word_tokenizer(str(model_dir))
    try:
        model = AutoModelForTokenClassification.from_pretrained(model_dir, **common.pretrained_kwargs()).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the model in {model_dir}: {common.first_line(error)}") from None
    model.to(common.inference_device())
    print_entities(texts, predict_entities(model, tokenizer, texts, args.max_length, args.eval_batch_size))


# --------------------------------------------------------------------------------------------
# Saving and reporting
# --------------------------------------------------------------------------------------------


def report(metrics: dict[str, Any], output_dir: Path) -> None:
    encoders.print_run_summary(metrics, "sentences_per_s", "sentences")
    print(f"scoring    {metrics['scheme']['scoring']} (tags found: "
          + ", ".join(f"{split} {scheme}" for split, scheme in metrics["scheme"]["detected"].items()) + ")")
    rows = []
    for split in ("validation", "test"):
        if split in metrics:
            m = metrics[split]
            rows.append([split, m["examples"], m["precision"], m["recall"], m["f1"], m["accuracy"]])
    print()
    print(reports.format_table(rows, ["split", "sentences", "precision", "recall", "entity f1", "token accuracy"]))
    last_split = "test" if "test" in metrics else "validation"
    print(f"\n{last_split}, per entity type:")
    print(reports.format_table(
        [[kind, v["precision"], v["recall"], v["f1"], v["support"]] for kind, v in metrics[last_split]["per_type"].items()],
        ["type", "precision", "recall", "f1", "support"]))
    print(f"\nsaved to {output_dir}: model, model card (README.md), metrics.json, run_config.json, training log, "
          f"{common.PLOT_FILE} and {reports.ENTITY_F1_FILE}")


def load_data(args: argparse.Namespace) -> encoders.EncoderData:
    """Read, check and convert the data to IOB2; print what it holds."""
    if args.dataset:
        common.quiet_libraries()
    splits, source = load_splits(args)
    label_names = prepare_splits(args, splits)
    common.check_one_batch(len(splits["train"].sentences), args.batch_size, "sentences")
    detected = {name: split.scheme for name, split in splits.items()}
    sizes = ", ".join(f"{name} {len(split.sentences)}" for name, split in splits.items())
    types = sorted({name[2:] for name in label_names if name != "O"})
    print(f"data: {source}: {sizes} sentences; {len(types)} entity types: {', '.join(types)}")
    print(f"tags: {', '.join(f'{name} {scheme}' for name, scheme in detected.items())} "
          f"(converted to IOB2; scored with {SCORING})")
    scheme = {"detected": detected, "converted_to": "IOB2", "scoring": SCORING,
              "label_all_tokens": args.label_all_tokens, "max_length": args.max_length}
    return encoders.EncoderData(splits, label_names, source, {"scheme": scheme})


def encode_splits(tokenizer, data: encoders.EncoderData, args: argparse.Namespace) -> dict[str, Encoded]:
    encoded = {name: encode_split(tokenizer, split, data.label_names, args, by_length=name != "train")
               for name, split in data.splits.items()}
    for name, split in encoded.items():
        if split.split_count:
            pieces = len(split.windows) - len(split.gold) + split.split_count
            print(f"note: {split.split_count} {name} sentence(s) longer than --max-length {args.max_length} "
                  f"tokens were split into {pieces} windows of whole words (no word is dropped).")
    data.record["scheme"]["split_sentences"] = {name: split.split_count for name, split in encoded.items()}
    return encoded


def data_collator(tokenizer):
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer)


TASK = encoders.EncoderTask(
    name="ner", metrics_task="token-classification", kind="token-classification",
    peft_task_type="TOKEN_CLS", auto_class="AutoModelForTokenClassification",
    logged_metrics=("f1", "precision", "recall", "accuracy"), rate=("sentences_per_s", "sentences"),
    load_data=load_data, class_weights=lambda args, train, labels: None, load_tokenizer=load_word_tokenizer,
    encode=encode_splits,
    collator=data_collator, compute_metrics=trainer_metrics, evaluate=evaluate, counts=counts,
    plot_results=reports.plot_entity_f1, report=report)


def run(args: argparse.Namespace, method: str = "full") -> dict[str, Any] | None:
    """Train and evaluate; `method` is "full" or "lora" (lora_finetuning.py --task ner). Returns the
    metrics, or None when training was interrupted (a checkpoint was saved)."""
    return encoders.run_encoder_task(args, method, TASK)


def main() -> int:
    args = parse_args()
    common.set_trust_remote_code(args.trust_remote_code)
    if args.predict:
        predict(args)
        return 0
    return 0 if run(args) is not None else 130


if __name__ == "__main__":
    common.run_cli(main)

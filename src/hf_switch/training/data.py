"""Data for training: raw datasets through `datasets`, a tokenizer, and tokenised train/validation splits."""

import json
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .arguments import DataArguments
from .span_corruption import SpanCorruption, raw_length_for_input_length

NUM_SENTINELS = 100
FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def embedded_corpus() -> list[str]:
    """Paragraphs of Python's own help topics (`pydoc_data.topics`, about 465k characters; ships with Python)."""
    from pydoc_data.topics import topics

    paragraphs = (paragraph.strip() for text in topics.values() for paragraph in text.split("\n\n"))
    return [" ".join(paragraph.split()) for paragraph in paragraphs if len(paragraph) > 40]


def _data_format(path: str, argument: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--{argument}: no file at {path!r}.")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"--{argument}: {path!r} is empty.")
    suffixes = [suffix for suffix in Path(path).suffixes if suffix != ".gz"]
    if not suffixes or suffixes[-1] not in FORMATS:
        raise ValueError(f"--{argument}: {path!r} must end in one of {sorted(FORMATS)} (optionally .gz).")
    return FORMATS[suffixes[-1]]


def _load_files(files: dict[str, str], arguments: dict[str, str]) -> DatasetDict:
    formats = {_data_format(path, arguments[split]) for split, path in files.items()}
    if len(formats) > 1:
        raise ValueError(f"--train_file and --validation_file must have the same format; got {sorted(formats)}.")
    return load_dataset(formats.pop(), data_files=files)


def _load_parallel(source_path: str, target_path: str, split: str, data_args: DataArguments) -> Dataset:
    sides = {}
    for side, path, column in (
        ("source", source_path, data_args.source_column),
        ("target", target_path, data_args.target_column),
    ):
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{split}_{side}_file: no file at {path!r}.")
        sides[column] = load_dataset("text", data_files=path, split="train")["text"]
    lengths = {column: len(lines) for column, lines in sides.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"--{split}_source_file and --{split}_target_file must have one line per pair; got {lengths} lines."
        )
    return Dataset.from_dict(sides)


def load_raw_datasets(data_args: DataArguments, seed: int) -> DatasetDict:
    """A `DatasetDict` with `train` and `validation` splits, from the Hub, local files, or the embedded default."""
    if data_args.uses_embedded_default:
        raw = DatasetDict(train=Dataset.from_dict({data_args.text_column: embedded_corpus()}))
    elif data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_source_file or data_args.validation_source_file:
        raw = DatasetDict()
        for split in ("train", "validation"):
            source, target = getattr(data_args, f"{split}_source_file"), getattr(data_args, f"{split}_target_file")
            if source or target:
                if not (source and target):
                    raise ValueError(f"--{split}_source_file and --{split}_target_file must be given together.")
                raw[split] = _load_parallel(source, target, split, data_args)
    else:
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        files = {split: path for split, path in files.items() if path}
        raw = _load_files(files, {split: f"{split}_file" for split in files})

    if "train" not in raw:
        raise ValueError(
            "No training data: give --train_file, --train_source_file/--train_target_file or --dataset_name."
        )
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise ValueError(f"The {split} split is empty: check the data files or --dataset_name.")
    return raw


def load_test_split(data_args: DataArguments) -> Dataset:
    """The raw test split of `--test_file` or `--test_source_file`/`--test_target_file`, sources and references as
    written (predictions are scored against these, not against tokenised and decoded references)."""
    if data_args.test_source_file or data_args.test_target_file:
        if not (data_args.test_source_file and data_args.test_target_file):
            raise ValueError("--test_source_file and --test_target_file must be given together.")
        if data_args.test_file:
            raise ValueError("Give the test set once: --test_file, or --test_source_file and --test_target_file.")
        test = _load_parallel(data_args.test_source_file, data_args.test_target_file, "test", data_args)
    else:
        test = _load_files({"test": data_args.test_file}, {"test": "test_file"})["test"]
    check_columns(DatasetDict(test=test), data_args)
    if len(test) == 0:
        raise ValueError("The test split is empty: check --test_file or --test_source_file.")
    return test


def _required_columns(data_args: DataArguments) -> list[tuple[str, str]]:
    if data_args.objective == "span_corruption":
        return [("text_column", data_args.text_column)]
    return [("source_column", data_args.source_column), ("target_column", data_args.target_column)]


def check_columns(raw: DatasetDict, data_args: DataArguments) -> None:
    for split, dataset in raw.items():
        for argument, column in _required_columns(data_args):
            if column not in dataset.column_names:
                raise ValueError(
                    f"The {split} split has no column {column!r} (columns: {dataset.column_names}); "
                    f"name the right one with --{argument}."
                )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A T5-style Unigram tokenizer: `<pad>`=0, `</s>`=1, `<unk>`=2, sentinels `<extra_id_0..99>`, the pieces learnt
    from `texts` (`vocab_size` in all with the special tokens), then sentencepiece's 256 byte pieces for byte
    fallback (`with_byte_fallback`)."""
    sentinels = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", *sentinels], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer = with_byte_fallback(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=sentinels,
    )


BYTE_PIECES = [f"<0x{byte:02X}>" for byte in range(256)]


def with_byte_fallback(tokenizer: Tokenizer) -> Tokenizer:
    """The trained Unigram `tokenizer` with the byte pieces `<0x00>` ... `<0xFF>` appended and byte fallback on, as
    sentencepiece's `byte_fallback`: a character no piece covers becomes its UTF-8 bytes instead of `<unk>`, and
    decodes back to itself. Fallback does not need the byte pieces to score: they score far below any split into
    learnt pieces, so a literal "<0x41>" in the text stays those six characters."""
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    lowest = min(score for _, score in vocab)
    vocab += [[piece, lowest - 1000.0] for piece in BYTE_PIECES]
    state["model"]["byte_fallback"] = True
    state["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, state["decoder"]]}
    return Tokenizer.from_str(json.dumps(state))


def sentinel_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... as long as the tokenizer has them."""
    ids = []
    for index in range(NUM_SENTINELS):
        token_id = tokenizer.convert_tokens_to_ids(f"<extra_id_{index}>")
        if token_id is None or token_id == tokenizer.unk_token_id:
            break
        ids.append(token_id)
    if not ids:
        raise ValueError(
            f"The tokenizer {tokenizer.name_or_path!r} has no sentinel tokens (<extra_id_0>, ...), which span "
            "corruption needs: use a T5 tokenizer, or leave out --tokenizer_name_or_path to train one that has them."
        )
    return ids


def _span_corruption_map(tokenizer, data_args: DataArguments, seed: int):
    """Raw text -> fixed-length token chunks -> span-corrupted `input_ids` and `labels`."""
    chunk = raw_length_for_input_length(
        data_args.max_source_length, data_args.noise_density, data_args.mean_noise_span_length
    )
    corruption = SpanCorruption(
        sentinel_ids=sentinel_ids(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        noise_density=data_args.noise_density,
        mean_noise_span_length=data_args.mean_noise_span_length,
        seed=seed,
    )

    def to_chunks(batch):
        ids = tokenizer(batch[data_args.text_column], add_special_tokens=False)["input_ids"]
        stream = list(chain.from_iterable(ids))
        usable = len(stream) - len(stream) % chunk
        return {"input_ids": [stream[start : start + chunk] for start in range(0, usable, chunk)]}

    def apply(dataset, split):
        chunks = dataset.map(to_chunks, batched=True, remove_columns=dataset.column_names, desc=f"chunk {split}")
        return chunks.map(corruption, batched=True, with_indices=True, desc=f"span-corrupt {split}")

    return apply


def _seq2seq_map(tokenizer, data_args: DataArguments):
    """Source/target columns -> `input_ids` (with the task prefix) and `labels`, truncated."""

    def to_pairs(batch):
        sources = [data_args.source_prefix + text for text in batch[data_args.source_column]]
        model_inputs = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        targets = tokenizer(
            text_target=batch[data_args.target_column], max_length=data_args.max_target_length, truncation=True
        )
        model_inputs["labels"] = targets["input_ids"]
        return model_inputs

    def apply(dataset, split):
        return dataset.map(to_pairs, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {split}")

    return apply


def tokenize(raw: DatasetDict, tokenizer, data_args: DataArguments, seed: int) -> DatasetDict:
    """`input_ids` and `labels` per example, for the objective in `data_args`."""
    if data_args.objective == "span_corruption":
        apply = _span_corruption_map(tokenizer, data_args, seed)
    else:
        apply = _seq2seq_map(tokenizer, data_args)
    tokenized = DatasetDict({split: apply(dataset, split) for split, dataset in raw.items()})
    for split, dataset in tokenized.items():
        if len(dataset) == 0:
            raise ValueError(
                f"The {split} split has no example after tokenisation (too little text for chunks of "
                f"--max_source_length={data_args.max_source_length})."
            )
    return tokenized

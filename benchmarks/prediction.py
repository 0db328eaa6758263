"""`hf-switch predict`'s generation loop against a plain transformers `generate()` loop over the same model, sources
and batch size.

The sources are the Multi30k 2016 test captions (`../shared/data/multi30k`), else the embedded corpus's paragraphs
cut to 5-40 words; the model is the mini preset's Switch (8 experts, every other layer) with a tokenizer trained on
the sources, at random weights: every output runs to `max_new_tokens`, so what differs is the padding of the sources
(length-sorted batches in hf_switch, input order in the plain loop).
"""

import gzip
from pathlib import Path

import torch

from hf_switch import SwitchConfig, SwitchForConditionalGeneration
from hf_switch.prediction import generate_predictions
from hf_switch.training.arguments import PRESETS
from hf_switch.training.data import embedded_corpus, train_tokenizer

from .timing import compare

MULTI30K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k" / "test_2016_flickr.en.gz"


def sources(count: int) -> list[str]:
    if MULTI30K_TEST.is_file():
        with gzip.open(MULTI30K_TEST, "rt", encoding="utf-8") as handle:
            return [line.strip() for line in handle][:count]
    return [" ".join(text.split()[: 5 + index % 36]) for index, text in enumerate(embedded_corpus()[:count])]


def mini_switch(vocab_size: int) -> SwitchForConditionalGeneration:
    dims = PRESETS["mini"]
    torch.manual_seed(0)
    config = SwitchConfig(
        **dims,
        vocab_size=vocab_size,
        num_sparse_encoder_layers=dims["num_layers"] // 2,
        num_sparse_decoder_layers=dims["num_layers"] // 2,
        decoder_start_token_id=0,
    )
    return SwitchForConditionalGeneration(config).eval()


def measure(rounds: int, count: int = 256, batch_size: int = 64, new_tokens: int = 24) -> dict:
    """`{"greedy": compare(...), "beams=4": compare(...)}`: time / the plain loop's time, same batches of sources."""
    texts = sources(count)
    tokenizer = train_tokenizer(texts, 2000)
    model = mini_switch(len(tokenizer))

    def plain_loop(**generation):
        outputs = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                generated = model.generate(**batch, max_new_tokens=new_tokens, **generation)
            outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
        return outputs

    def hf_switch_predict(**generation):
        return generate_predictions(
            model, tokenizer, texts, batch_size=batch_size, progress=False, max_new_tokens=new_tokens, **generation
        )

    results = {}
    for name, generation in (("greedy", {}), ("beams=4", {"num_beams": 4})):
        results[name] = compare(
            {
                "plain generate() loop": lambda generation=generation: plain_loop(**generation),
                "hf-switch predict": lambda generation=generation: hf_switch_predict(**generation),
            },
            baseline="plain generate() loop",
            rounds=rounds,
            warmup=1,
        )
        for variant in results[name].values():
            variant["sentences_per_s"] = len(texts) / variant["median_s"]
    return results

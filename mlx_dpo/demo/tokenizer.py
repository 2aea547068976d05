"""The byte-level BPE chat tokenizer of the bundled demo model, also used by the tests' tiny
checkpoints: trained here, written as tokenizer.json + tokenizer_config.json (ChatML specials,
eos = <|im_end|>) in the layout mlx-lm and transformers load."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_dpo.data import CHATML

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_chat_tokenizer(
    out: Path,
    texts: list[str],
    vocab_size: int,
    *,
    chat_template: str | None = CHATML,
    model_max_length: int = 512,
):
    """Train on `texts` and write both files into `out`; returns the `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(Path(out) / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": model_max_length,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok

"""Tiny random-init backbones (Llama, OPT, GPT-2, Qwen2, BERT) for fast, offline unit tests.

Each is saved as a normal transformers folder with a byte-level tokenizer built locally, so it
loads through exactly the same path as a real model.
"""

from __future__ import annotations

from pathlib import Path

TINY_FAMILIES = ("llama", "opt", "gpt2", "qwen2", "bert")


def _byte_tokenizer(decoder: bool):
    """A 256-symbol byte-level BPE tokenizer with no merges: needs no download and covers any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<unk>"] if decoder else ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[3]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if decoder:
        return PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]"
    )


def tiny_config(family: str, hidden: int = 64, layers: int = 4, vocab: int = 260):
    """A small config of ``family``: ``hidden`` wide, ``layers`` deep."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    heads = max(1, hidden // 16)
    if family in ("llama", "qwen2"):  # the same decoder settings, two config classes
        return (LlamaConfig if family == "llama" else Qwen2Config)(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            ffn_dim=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=512,
            word_embed_proj_dim=hidden,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=512,
            pad_token_id=0,
        )
    raise ValueError(f"unknown tiny family {family!r}: choose one of {', '.join(TINY_FAMILIES)}")


def make_tiny_model(family: str, path: str | Path, hidden: int = 64, layers: int = 4, seed: int = 0) -> Path:
    """Save a random-init ``family`` model with its tokenizer at ``path`` and return the path."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    path = Path(path)
    config = tiny_config(family, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.save_pretrained(path)
    _byte_tokenizer(decoder=family != "bert").save_pretrained(path)
    return path

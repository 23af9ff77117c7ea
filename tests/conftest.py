"""Tiny models built from transformers configs (no downloads), and the case tables that drive the common tests.

As PEFT's `tests/test_custom_models.py` crosses its `TEST_CASES` into `pytest.mark.parametrize`, the common tests
(identity at init, gradients, the no-grad boundary, disable_adapter, save/reload, cached generation) cross
`CONFIG_CASES` (which LadderConfig) with `ARCHS` (which backbone). Named subsets of `ARCHS` (`ROTARY`,
`ABSOLUTE_POSITIONS`, `SOFT_CAPPED`, `SEQ_CLS`) are for tests about one kind of architecture. Every test builds its
adapter with `ladder(...)` and reads outputs with `logits(...)`.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from typing import NamedTuple

import pytest
import torch
import transformers as tf
from peft import get_peft_model

from peft_ladder import LadderConfig

VOCAB = 96
# name -> config factory: the architectures every common test runs on.
ARCHS = {
    "llama": lambda: tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    ),
    "qwen2": lambda: tf.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    ),
    "qwen3": lambda: tf.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
    ),
    "mistral": lambda: tf.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        sliding_window=None,
    ),
    "gemma3": lambda: tf.Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        sliding_window=8,
    ),
    "opt": lambda: tf.OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=64,
        max_position_embeddings=128,
    ),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=128),
}
# Variants of an architecture that a subset needs and the common tests do not: name -> (architecture, overrides).
# Gemma 3's config leaves final_logit_softcapping off (Gemma 2 ships 30.0). The tiny model's logits stay below 1, so a
# cap of 1.0 bends them by about 10% where 30.0 would change them by about 1e-5.
VARIANTS = {"gemma3-softcapped": ("gemma3", {"final_logit_softcapping": 1.0})}

CAUSAL = {
    "llama": tf.LlamaForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "qwen3": tf.Qwen3ForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "gemma3": tf.Gemma3ForCausalLM,
    "opt": tf.OPTForCausalLM,
    "gpt2": tf.GPT2LMHeadModel,
}
SEQ_CLS_CLASSES = {
    "llama": tf.LlamaForSequenceClassification,
    "qwen2": tf.Qwen2ForSequenceClassification,
    "opt": tf.OPTForSequenceClassification,
    "gpt2": tf.GPT2ForSequenceClassification,
}

# Named architecture subsets.
ROTARY = ("llama", "qwen2", "qwen3", "mistral", "gemma3")  # rotary position embeddings inside attention
ABSOLUTE_POSITIONS = ("opt", "gpt2")  # learned position embeddings added to the token embeddings
SOFT_CAPPED = ("gemma3-softcapped",)  # final_logit_softcapping on the LM head's logits
SEQ_CLS = tuple(SEQ_CLS_CLASSES)  # with a sequence-classification head
assert set(ROTARY) | set(ABSOLUTE_POSITIONS) == set(ARCHS)

# Encoder-only backbones: a parallel table, since the decoder tests assume a causal LM (labels = input ids, generate).
# BERT and RoBERTa are post-norm (Ladder fuses at the encoder's output); ModernBERT is pre-norm with a final norm and
# alternating sliding-window / global attention layers.
ENCODER_ARCHS = {
    "bert": lambda: tf.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=VOCAB
    ),
    "roberta": lambda: tf.RobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=VOCAB
    ),
    "modernbert": lambda: tf.ModernBertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=VOCAB,
        global_attn_every_n_layers=2,
        local_attention=8,  # a 4-token half-window: the 12-token test batches see it
        bos_token_id=2,
        eos_token_id=1,
        cls_token_id=2,
        sep_token_id=1,
    ),
}
# task type -> transformers auto class: what a PEFT user builds for each encoder use.
ENCODER_TASKS = {
    "SEQ_CLS": tf.AutoModelForSequenceClassification,
    "TOKEN_CLS": tf.AutoModelForTokenClassification,
    "FEATURE_EXTRACTION": tf.AutoModel,  # sentence embeddings: last_hidden_state, pooled by the user
}
ENCODER_LABELS = 3

# Encoder-decoder backbones for SEQ_2_SEQ_LM (tests/test_encdec.py): a parallel table, as for encoders. The encoder
# has 3 layers and the decoder 2, so nothing may assume equal depths. "t5" is the original T5 (ReLU, tied embeddings,
# the LM head's input scaled by d_model**-0.5), "flan-t5" the T5 v1.1 / Flan-T5 form (gated GELU, untied head),
# "bart" a post-norm model with learned positions and no final norm.
SEQ2SEQ_ARCHS = {
    "t5": lambda: tf.T5Config(
        d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=3, num_decoder_layers=2, vocab_size=VOCAB
    ),
    "flan-t5": lambda: tf.T5Config(
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_heads=4,
        num_layers=3,
        num_decoder_layers=2,
        vocab_size=VOCAB,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
    "bart": lambda: tf.BartConfig(
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_layers=3,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        forced_eos_token_id=None,
    ),
}


def tiny_seq2seq(arch: str = "t5", seed: int = 0):
    """A tiny encoder-decoder LM (SEQ2SEQ_ARCHS): pad 0, eos 1, generation starts from token 2."""
    config = SEQ2SEQ_ARCHS[arch]()
    config.pad_token_id, config.eos_token_id, config.bos_token_id, config.decoder_start_token_id = 0, 1, 2, 2
    torch.manual_seed(seed)
    return tf.AutoModelForSeq2SeqLM.from_config(config).eval()


HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
# A test that needs bitsandbytes carries the tier marker and this clean skip where it is not installed.
requires_bitsandbytes = pytest.mark.skipif(
    not HAS_BITSANDBYTES, reason="needs bitsandbytes: pip install 'peft-ladder[bnb]'"
)
BITSANDBYTES = [pytest.mark.bitsandbytes, requires_bitsandbytes]  # the same two, for a pytest.param's marks

# id -> LadderConfig keyword arguments (on top of ladder()'s defaults): every kind of adapter a user can configure.
CONFIG_CASES = {
    "ladder": {},
    "xladder": {"connections": "xladder"},
    "explicit-map": {"connections": {0: 0, 1: 1}, "side_layers": 3},  # two connected side blocks, one deeper block
    "learned-gate": {"gate": "learned"},
    "fixed-gate": {"gate": 0.5},
    "side-layers-2": {"side_layers": 2},  # fewer side blocks than the backbone's 4 layers
    "down-rank": {"down_rank": 4},  # low-rank down-projections d -> 4 -> d_s (QST)
    "quantized-4bit": {"quantization": "4bit"},
}
QUANTIZED = {name for name, kwargs in CONFIG_CASES.items() if kwargs.get("quantization")}
# One rotary and one absolute-position architecture: the two families of attention code a side block follows.
REPRESENTATIVE = (ROTARY[0], ABSOLUTE_POSITIONS[-1])


class Case(NamedTuple):
    arch: str
    config: str

    @property
    def kwargs(self) -> dict:
        return CONFIG_CASES[self.config]

    @property
    def quantized(self) -> bool:
        return self.config in QUANTIZED


def cases(archs, configs=CONFIG_CASES) -> list:
    """`archs` x `configs` as pytest params with ids like `llama-xladder`; quantized ones carry BITSANDBYTES."""
    return [
        pytest.param(Case(arch, config), id=f"{arch}-{config}", marks=BITSANDBYTES if config in QUANTIZED else [])
        for config in configs
        for arch in archs
    ]


# Why not the full product everywhere: a 4-bit backbone costs seconds to quantize on CPU where a float one costs
# milliseconds, and generation or save/reload cost far more than a forward. The suite has to stay within minutes.
# * CHEAP_CASES (identity, gradients, the no-grad boundary, disable_adapter: one or two forwards) run every
#   float config on every architecture, and the quantized config on the representative pair.
# * EXPENSIVE_CASES (save/reload, cached generation) run every config on the representative pair, and the two
#   presets on every architecture (each architecture's own attention and cache code).
FLOAT_CONFIGS = [name for name in CONFIG_CASES if name not in QUANTIZED]
CHEAP_CASES = cases(ARCHS, FLOAT_CONFIGS) + cases(REPRESENTATIVE, QUANTIZED)
EXPENSIVE_CASES = cases(REPRESENTATIVE) + cases([a for a in ARCHS if a not in REPRESENTATIVE], ["ladder", "xladder"])


def tiny_config(arch: str, **overrides):
    if arch in VARIANTS:
        arch, variant_overrides = VARIANTS[arch]
        overrides = {**variant_overrides, **overrides}
    config = ARCHS[arch]()
    config.pad_token_id = 0
    config.eos_token_id = 1
    config.bos_token_id = 2
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return CAUSAL[VARIANTS.get(arch, (arch,))[0]](tiny_config(arch, **overrides)).eval()


def tiny_seq_cls(arch: str = "llama", seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    return SEQ_CLS_CLASSES[arch](tiny_config(arch, num_labels=num_labels)).eval()


def tiny_encoder(arch: str = "bert", task: str = "SEQ_CLS", seed: int = 0):
    """A tiny encoder-only model for `task` (ENCODER_TASKS), the padding token 0, 3 labels."""
    config = ENCODER_ARCHS[arch]()
    config.pad_token_id = 0
    config.num_labels = ENCODER_LABELS
    torch.manual_seed(seed)
    return ENCODER_TASKS[task].from_config(config).eval()


def encoder_output(model, inputs: dict | None = None) -> torch.Tensor:
    """What an encoder user reads (classifier logits, or last_hidden_state for embeddings), without autograd."""
    with torch.no_grad():
        out = model(**(inputs if inputs is not None else batch()))
    return out.logits if "logits" in out else out.last_hidden_state


def bnb_4bit_causal_lm(arch: str = "llama"):
    """`tiny_causal_lm(arch)` loaded through transformers with what LadderConfig(quantization='4bit') documents as
    its equivalent BitsAndBytesConfig: the base model a quantized adapter must reproduce."""
    with tempfile.TemporaryDirectory() as path:
        tiny_causal_lm(arch).save_pretrained(path)
        quantization = tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        return tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization).eval()


def base_model(case: Case):
    """The model without any adapter that `ladder(case.arch, **case.kwargs)` sits on."""
    return bnb_4bit_causal_lm(case.arch) if case.quantized else tiny_causal_lm(case.arch)


def ladder(model_or_arch="llama", *, seed: int | None = None, **config_kwargs):
    """`get_peft_model(model, LadderConfig(...))` with the tests' defaults (a causal LM, reduction_factor=4).

    A string builds `tiny_causal_lm(model_or_arch)`. `seed` seeds the side network's initialisation. The notice
    that LadderConfig(quantization=...) quantized the backbone is silenced: tests about it call get_peft_model.
    """
    from peft_ladder.quantization import LadderQuantizationWarning

    model = tiny_causal_lm(model_or_arch) if isinstance(model_or_arch, str) else model_or_arch
    config_kwargs = {"task_type": "CAUSAL_LM", "reduction_factor": 4, **config_kwargs}
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LadderQuantizationWarning)
        return get_peft_model(model, LadderConfig(**config_kwargs))


def side_of(model, adapter: str = "default"):
    """The side network of `adapter`, held by the model's fusion layer."""
    return next(m.ladder_side[adapter] for m in model.modules() if hasattr(m, "ladder_side"))


def logits(model, inputs: dict | None = None) -> torch.Tensor:
    """The model's logits on `inputs` (default: `batch()`), without autograd."""
    with torch.no_grad():
        return model(**(inputs if inputs is not None else batch())).logits


def batch(seed: int = 1, size: int = 2, length: int = 12) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (size, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param

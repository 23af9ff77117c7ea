"""Fine-tune with LoRA, QLoRA, Ladder or xLadder from the same TRL training code: only the PEFT config line differs.

    python examples/train.py                                   # all four methods, tiny local model, CPU, a few steps
    python examples/train.py --method ladder --steps 50
    python examples/train.py --method lora ladder --model path/to/local/model --data my.jsonl

Without `--model` a small random Llama and a character tokenizer are built in the output folder (no download), and
the data is a synthetic "continue the sequence" task. With `--model`, any local causal LM directory (with its
tokenizer) is used; `--data` is a .txt file (one example per line) or a .jsonl file with a "text" field.

For each method the script prints `print_trainable_parameters()`, the first and last training loss, and where the
adapter was saved. QLoRA loads the model in 4-bit with bitsandbytes (`pip install 'peft-ladder[bnb]'`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from peft_ladder import LadderConfig

METHODS = ("lora", "qlora", "ladder", "xladder")


def peft_config(method: str):
    """The one line that changes between methods."""
    return {
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"),
        "qlora": lambda: LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"),
        "ladder": lambda: LadderConfig(task_type="CAUSAL_LM"),
        "xladder": lambda: LadderConfig(task_type="CAUSAL_LM", connections="xladder"),
    }[method]()


def load_model(path: str, method: str):
    """QLoRA's 4-bit loading is the other difference: the quantized backbone (Ladder can use one too)."""
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("--method qlora needs bitsandbytes: pip install 'peft-ladder[bnb]'") from None
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    return AutoModelForCausalLM.from_pretrained(path)


# --- the default tiny model and data (no download) ------------------------------------------------------------------

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def build_tiny_model(folder: Path) -> str:
    """A 4-layer, 128-wide random Llama with a character tokenizer, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{ch: 3 + i for i, ch in enumerate(ALPHABET + " ")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def synthetic_texts(count: int, seed: int = 0) -> list[str]:
    """'continue the sequence' rows: 24 consecutive characters of the alphabet, from a random start."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ALPHABET), (count,), generator=generator).tolist()
    return ["".join(ALPHABET[(s + k) % len(ALPHABET)] for k in range(24)) for s in starts]


def load_texts(path: str | None) -> list[str]:
    if path is None:
        return synthetic_texts(256)
    lines = Path(path).read_text().splitlines()
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in lines if line.strip()]
    return [line for line in lines if line.strip()]


# --- training -------------------------------------------------------------------------------------------------------


def train(method: str, model_path: str, texts: list[str], args: argparse.Namespace) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = SFTConfig(
        output_dir=str(Path(args.output_dir) / method),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=args.max_length,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=load_model(model_path, method),
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=peft_config(method),
    )
    print(f"\n== {method} ==")
    trainer.model.print_trainable_parameters()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    adapter_dir = Path(args.output_dir) / method / "adapter"
    trainer.save_model(adapter_dir)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    print(
        f"{method}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; adapter saved to {adapter_dir}"
    )
    return {"method": method, "trainable": trainable, "total": total, "first_loss": losses[0], "last_loss": losses[-1]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="one or more of lora, qlora, ladder, xladder (default: all four, in turn)",
    )
    parser.add_argument("--model", help="a local causal LM directory; default: a tiny random Llama (no download)")
    parser.add_argument(
        "--data", help="a .txt (one example per line) or .jsonl ('text' field) file; default: synthetic"
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per method (default 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated beyond)")
    parser.add_argument("--output-dir", help="where adapters are saved; default: a temporary folder")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as scratch:
        args.output_dir = args.output_dir or scratch
        model_path = args.model or build_tiny_model(Path(args.output_dir) / "tiny-llama")
        texts = load_texts(args.data)
        results = [train(method, model_path, texts, args) for method in args.method]
        print("\nmethod    trainable params   first loss   last loss")
        for r in results:
            print(f"{r['method']:<9} {r['trainable']:>16,}   {r['first_loss']:>10.4f}   {r['last_loss']:>9.4f}")
    return results


if __name__ == "__main__":
    main()

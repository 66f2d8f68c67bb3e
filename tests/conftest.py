"""Shared fixtures: a tiny real tokenizer and a tiny random Llama model saved to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny models run much faster single-threaded, and the test machine's cores are shared.
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """
Below is an instruction that describes a task, paired with an input that provides further
context. Write a response that appropriately completes the request.
### Instruction: ### Input: ### Response: Question: Answer: Options: The answer is
Is this news headline sarcastic? Answer yes or no. yes no
Which is heavier, a feather or a brick? The brick is heavier than the feather.
What color is the sky on a clear day? blue green red yellow purple
Resistance increases when you add more resistors. It decreases when you remove them.
Sound gets louder closer to the speaker and quieter further away. up down greater smaller
How would Alex feel afterwards? happy sad angry tired hungry full excited bored
What will happen to Robin next? go home call a friend eat dinner go to sleep
Translate to French: hello world bonjour le monde. Name a fruit: apple banana cherry.
Add the numbers 1 2 3 4 5 6 7 8 9 10. The cat sat on the mat. A dog ran in the park.
scientists unveil doomsday clock of hair loss; area man wins lottery; city council meets.
""".strip()


def build_tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` with chat tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0):
    """A tiny randomly initialised ``LlamaForCausalLM`` (hidden 64, 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real fast tokenizer (eos ``<|im_end|>``, pad ``<|pad|>``, simple chat template)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A directory with a tiny seeded random Llama model and the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(tiny_tokenizer))
    model.config.eos_token_id = tiny_tokenizer.eos_token_id
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer) loaded from :func:`tiny_llama_dir`; treat as read-only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)

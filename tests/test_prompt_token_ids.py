"""Prompt token ids equal the ones the original LLaVA-1.5 evaluation builds (DESIGN.md §5, "Token ids").

The original `tokenizer_image_token` splits the prompt at `<image>`, tokenizes every chunk with the slow
sentencepiece `LlamaTokenizer` (legacy, transformers 4.3x) and drops the BOS of later chunks. For text without
special-token strings that tokenizer's ids are exactly `sentencepiece`'s `encode`, which adds the dummy prefix `▁`
to every non-empty chunk. So the independent reference here is `[bos] + sp.encode(chunk0)`, the image ids,
`sp.encode(chunk1)` and so on, computed with the `sentencepiece` library on the checkpoint's own `tokenizer.model`.
It is compared with `tokenize_with_image` using the tokenizer `load_original_checkpoint` gives (transformers 5.x
`LlamaTokenizer` converted from that `tokenizer.model`). With the real Llama tokenizer the ids around the image are
`… 29901 ":", 29871 "▁", <image>, 29871 "▁", 13 "<0x0A>", …`; the tiny sentencepiece model trained here is
configured like Llama's (BPE, byte fallback, digits split, identity normalisation, dummy prefix on, extra whitespace
kept, whitespace-only pieces such as "▁▁") so that the same cases occur: a lone "▁" piece, newline by byte fallback,
"°" by byte fallback, "é" as a piece.
"""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from test_original_checkpoint import (
    LLAMA_FIELDS,
    _original_config,
    _projector_weights,
    _save_tower,
    _write_json,
    _write_shards,
    _write_tokenizer,
)
from transformers import LlamaConfig, LlamaForCausalLM

from fastv_advanced.original_checkpoint import load_original_checkpoint
from fastv_advanced.prompting import IMAGE_PLACEHOLDER, build_prompt, num_image_tokens, tokenize_with_image
from fastv_advanced.tiny import build_tokenizer

_LLAMA_LIKE_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "Answer with the option's letter from the given choices directly.",
    "Context: Which of these is the answer? The answer is A. B. C. D. E. What colour is the circle?",
    "The café is 25 degrees. Don't  use   two spaces. It's 100 km.    Indented  text.",  # "▁▁" pieces
] * 8  # no newline, no "°", no "ï": those must come out as byte-fallback pieces

# ScienceQA questions as LLaVA's question file has them (Context line, question, lettered options), with tricky
# characters: newlines, leading/trailing/double spaces, tabs, digits, apostrophes and quotes, non-ASCII.
QUESTIONS = [
    "Context: The water in the pot is 25 °C.\nWhich word describes the water?\nA. hot\nB. cold\nC. it's warm",
    "  Which  word is  spelled right? \t\nA. café\nB. naïve\nC. 100 km  ",
    "Context: Don't touch the 3 cups.\nWhat's 12 + 30?\nA. 42\nB. 4'2\"\nC. 1,000",
    "Context: Émile's café serves crème brûlée at 60°C.\nWhich is French?\nA. é\nB. ñ\nC. 日本 — “quotes”",
    "Context: Line one.\n\nLine three.\n\nWhat colour is the circle?\nA. red\nB. blue",
]

# Prompts whose chunks start or end with whitespace, a literal "▁", are empty, or hold several images.
RAW_PROMPTS = [
    "USER: <image> What?",
    "USER:  <image>  \n What",
    "<image>\nWhat colour is the circle?",
    "USER: <image>",
    "a<image><image>b",
    " <image> and <image> ",
    "\u2581<image>\u2581x",
    "USER: <image>\n    Indented  text.\t tab",
    "x <image>\u00a0y 日本",
]


def _write_llama_like_tokenizer(directory) -> None:
    """tokenizer.model trained with Llama's sentencepiece settings + the original tokenizer_config/special tokens."""
    _write_tokenizer(directory, with_pad=True, corpus=_LLAMA_LIKE_CORPUS, vocab_size=600, hard_vocab_limit=False,
                     allow_whitespace_only_pieces=True, add_dummy_prefix=True)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt-ids") / "clip-tower"
    path.mkdir()
    _save_tower(path)
    return path


@pytest.fixture(scope="module", params=["llama_like", "original_test_model"])
def checkpoint(request, tower, tmp_path_factory):
    """(sentencepiece processor, tokenizer, image token id, image tokens) of a tiny original-format checkpoint.

    `llama_like` uses the tokenizer.model trained above; `original_test_model` the one of
    tests/test_original_checkpoint.py (smaller vocabulary, no whitespace-only pieces).
    """
    directory = tmp_path_factory.mktemp("prompt-ids") / f"llava-v1.5-{request.param}"
    directory.mkdir()
    if request.param == "llama_like":
        _write_llama_like_tokenizer(directory)
    else:
        _write_tokenizer(directory, with_pad=True)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    vocab = sp.get_piece_size()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**{**LLAMA_FIELDS, "vocab_size": vocab}))
    _write_shards(directory, {**llama.state_dict(), **_projector_weights()})
    _write_json(directory / "config.json", _original_config(str(tower), vocab_size=vocab))
    model, processor = load_original_checkpoint(str(directory))
    return sp, processor.tokenizer, model.config.image_token_id, num_image_tokens(model.config)


def _reference_ids(sp: spm.SentencePieceProcessor, prompt: str, image_id: int, image_tokens: int) -> list[int]:
    """The original's ids from the sentencepiece model alone: BOS, then chunks by `sp.encode`, images between."""
    first, *rest = prompt.split(IMAGE_PLACEHOLDER)
    ids = [sp.bos_id()] + sp.encode(first)
    for chunk in rest:
        ids += [image_id] * image_tokens + sp.encode(chunk)
    return ids


def _pieces(sp, tokenizer, ids: list[int]) -> list[str]:
    """Readable pieces for assertion messages."""
    return [sp.id_to_piece(i) if i < sp.get_piece_size() else tokenizer.convert_ids_to_tokens(i) for i in ids]


def _assert_same_ids(checkpoint, prompt: str) -> list[int]:
    sp, tokenizer, image_id, image_tokens = checkpoint
    expected = _reference_ids(sp, prompt, image_id, image_tokens)
    actual = tokenize_with_image(prompt, tokenizer, image_id, image_tokens)
    assert actual == expected, f"{prompt!r}\nexpected {_pieces(sp, tokenizer, expected)}\n" \
                               f"actual   {_pieces(sp, tokenizer, actual)}"
    return actual


def test_tiny_sentencepiece_model_exercises_llama_cases(checkpoint):
    """The tokenizer.model has Llama's settings and the pieces that make the checked cases non-trivial."""
    sp, _, _, _ = checkpoint
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces
    assert proto.normalizer_spec.name == "identity"
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.model_type == proto.trainer_spec.BPE
    unk = sp.unk_id()
    assert sp.piece_to_id("\u2581") != unk and sp.piece_to_id("<0x0A>") != unk and sp.piece_to_id(":") != unk
    assert sp.piece_to_id("\n") == unk  # newline only by byte fallback, as in Llama (id 13)
    assert sp.encode_as_pieces("USER: ")[-1] == "\u2581"  # "USER: " ends with a lone "▁"
    assert sp.encode_as_pieces("\nWhich")[:2] == ["\u2581", "<0x0A>"]  # dummy prefix, then the newline byte
    assert sp.encode_as_pieces("°C")[1:3] == ["<0xC2>", "<0xB0>"]
    if sp.get_piece_size() > 300:  # the llama-like model
        assert sp.piece_to_id("\u2581\u2581") != unk and sp.piece_to_id("é") != unk
        assert sp.encode_as_pieces(" What")[0] == "\u2581\u2581"  # dummy prefix + the leading space


@pytest.mark.parametrize("has_image", [True, False])
@pytest.mark.parametrize("question", QUESTIONS)
def test_scienceqa_prompt_ids_match_sentencepiece(checkpoint, question, has_image):
    prompt = build_prompt(question, has_image=has_image, single_pred_prompt=True, conv_mode="vicuna_v1")
    assert prompt.endswith("\nAnswer with the option's letter from the given choices directly. ASSISTANT:")
    assert ("USER: <image>\n" in prompt) == has_image
    _assert_same_ids(checkpoint, prompt)


def test_ids_around_the_image_are_lone_spaces_then_newline(checkpoint):
    """`… ":", "▁", <image> × N, "▁", "<0x0A>", …` — the original's 29901, 29871, <image>, 29871, 13."""
    sp, _, image_id, image_tokens = checkpoint
    ids = _assert_same_ids(checkpoint, build_prompt(QUESTIONS[0], has_image=True, single_pred_prompt=True))
    start = ids.index(image_id)
    assert ids[start:start + image_tokens] == [image_id] * image_tokens and ids.count(image_id) == image_tokens
    assert ids[start - 2:start] == [sp.piece_to_id(":"), sp.piece_to_id("\u2581")]
    after = ids[start + image_tokens:start + image_tokens + 2]
    assert after == [sp.piece_to_id("\u2581"), sp.piece_to_id("<0x0A>")]
    assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1


@pytest.mark.parametrize("prompt", RAW_PROMPTS)
def test_chunk_edge_cases_match_sentencepiece(checkpoint, prompt):
    """Chunks starting with a space keep the dummy prefix ("▁▁"), as sentencepiece (and the slow tokenizer) give."""
    _assert_same_ids(checkpoint, prompt)


def _split_at_images(ids: list[int], image_id: int, image_tokens: int) -> list[list[int]]:
    """The text ids of each chunk; every image must be a run of exactly `image_tokens` ids."""
    chunks, current, index = [], [], 0
    while index < len(ids):
        if ids[index] == image_id:
            assert ids[index:index + image_tokens] == [image_id] * image_tokens
            chunks.append(current)
            current, index = [], index + image_tokens
        else:
            current.append(ids[index])
            index += 1
    return chunks + [current]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("prompt", [build_prompt(QUESTIONS[0], True, True), *RAW_PROMPTS])
def test_tiny_tokenizer_without_sentencepiece_model(tiny_tokenizer, prompt):
    """The in-repo tiny tokenizer (no tokenizer.model): one BOS, whole image runs, every chunk decodes to itself."""
    tokenizer = tiny_tokenizer
    image_id, image_tokens = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), 5
    ids = tokenize_with_image(prompt, tokenizer, image_id, image_tokens)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(image_id) == image_tokens * prompt.count(IMAGE_PLACEHOLDER)
    chunks = _split_at_images(ids[1:], image_id, image_tokens)
    # decoding turns a literal "▁" into a space, as sentencepiece does
    assert [tokenizer.decode(chunk) for chunk in chunks] == prompt.replace("\u2581", " ").split(IMAGE_PLACEHOLDER)
    if prompt.startswith("A chat"):  # the ScienceQA prompt: "▁" before and after the image, as with Llama
        start = ids.index(image_id)
        assert tokenizer.convert_ids_to_tokens(ids[start - 1]) == "\u2581"
        assert tokenizer.convert_ids_to_tokens(ids[start + image_tokens]) == "\u2581"

"""Original-format LLaVA-1.5 checkpoints: detection, conversion, logit equivalence and clear errors.

A tiny checkpoint in the layout of liuhaotian/llava-v1.5-7b is built offline (sentencepiece tokenizer, sharded
`pytorch_model-*.bin` with the original weight names, a CLIP tower saved beside it). The converted model's logits
are compared with an independent computation from the original weights: CLIP hidden states of layer -2 without
CLS, the projector by hand (linear, exact GELU, linear), spliced into the token embeddings where the original puts
the image (id -200), run through a plain `LlamaForCausalLM`.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from fastv_advanced.cli.convert import main as convert_main
from fastv_advanced.original_checkpoint import (
    convert_original_checkpoint,
    is_original_checkpoint,
    load_original_checkpoint,
)
from fastv_advanced.tiny import save_tiny_llava

VOCAB = 300
IMAGE_SIZE, PATCH = 32, 4
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 64 image tokens (CLS dropped)
VISION_HIDDEN, HIDDEN = 32, 64
ORIGINAL_IMAGE_ID = -200  # where the original splices the image features
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TOWER_MEAN_STD = [0.5, 0.5, 0.5]  # the tiny tower's preprocessor_config.json, distinguishable from CLIP's defaults
LLAMA_FIELDS = dict(
    hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-5, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    max_position_embeddings=512, hidden_act="silu",
)
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "Answer with the option's letter from the given choices directly.",
    "Context: Which of these is the answer? The answer is A. B. C. D. E. What colour is the circle?",
] * 8


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _write_json(path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def _write_tokenizer(directory, with_pad: bool, corpus=_CORPUS, **trainer_options) -> None:
    """A Llama-style sentencepiece tokenizer (bpe, byte fallback) + the original tokenizer_config/special tokens.

    `trainer_options` override the `SentencePieceTrainer` settings below.
    """
    options = dict(vocab_size=VOCAB, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
                   remove_extra_whitespaces=False, minloglevel=2)
    options.update(trainer_options)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, **options)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    special = {name: _added_token(text) for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"),
                                                           ("unk_token", "<unk>"))}
    _write_json(directory / "tokenizer_config.json", {
        **special, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "legacy": False, "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    })
    _write_json(directory / "special_tokens_map.json", {**special, **({"pad_token": "<unk>"} if with_pad else {})})


def _save_tower(directory) -> None:
    """A 3-layer CLIP vision tower (so layer -2 differs from the last) with its preprocessor_config.json."""
    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    CLIPVisionModel(config).save_pretrained(directory)
    _clip_processor().save_pretrained(directory)


def _reference_llama() -> LlamaForCausalLM:
    """The Llama decoder with the original weight names (model.embed_tokens, model.layers.N, model.norm, lm_head)."""
    torch.manual_seed(2)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA_FIELDS)).eval()
    with torch.no_grad():
        for name, parameter in llama.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm weights are ones at init: make them matter
                parameter.add_(0.2 * torch.randn_like(parameter))
    return llama


def _projector_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {"model.mm_projector.0.weight": 0.2 * torch.randn(HIDDEN, VISION_HIDDEN),
            "model.mm_projector.0.bias": 0.1 * torch.randn(HIDDEN),
            "model.mm_projector.2.weight": 0.2 * torch.randn(HIDDEN, HIDDEN),
            "model.mm_projector.2.bias": 0.1 * torch.randn(HIDDEN)}


def _original_config(tower: str, **changes) -> dict:
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **LLAMA_FIELDS,
        "mm_vision_tower": tower, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": VISION_HIDDEN,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
        "torch_dtype": "float32", **changes,
    }


def _write_shards(directory, weights: dict[str, torch.Tensor], shards: int = 2) -> None:
    names = sorted(weights)
    weight_map = {}
    for index in range(shards):
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = {name: weights[name].clone() for name in names[index::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(directory / "pytorch_model.bin.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """Paths, the reference decoder and the projector weights of a tiny original-format checkpoint."""
    root = tmp_path_factory.mktemp("original")
    tower, checkpoint = root / "clip-tower", root / "llava-v1.5-tiny"
    tower.mkdir(), checkpoint.mkdir()
    _save_tower(tower)
    llama, projector = _reference_llama(), _projector_weights()
    weights = {**llama.state_dict(), **projector,
               # ignored by the original loader: vision tower copies and old rotary buffers
               "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.zeros(VISION_HIDDEN),
               "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(HIDDEN // 8)}
    _write_shards(checkpoint, weights)
    _write_json(checkpoint / "config.json", _original_config(str(tower)))
    _write_json(checkpoint / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    _write_tokenizer(checkpoint, with_pad=True)
    return {"root": root, "tower": tower, "checkpoint": checkpoint, "llama": llama, "projector": projector}


@pytest.fixture(scope="module")
def converted(original):
    return load_original_checkpoint(str(original["checkpoint"]))


def _prompt_ids(checkpoint) -> list[int]:
    """Prompt ids built the original way: chunks around <image> tokenised separately, image at id -200."""
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    return [1] + sp.encode("USER:") + [ORIGINAL_IMAGE_ID] + sp.encode("\nWhat colour is the circle? ASSISTANT:")


def _clip_processor(mean=TOWER_MEAN_STD, std=TOWER_MEAN_STD) -> CLIPImageProcessorPil:
    """CLIP preprocessing at the tiny tower's size; by default the tower's own preprocessor_config.json values."""
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=mean, image_std=std)


def _pixel_values() -> torch.Tensor:
    """[1, 3, 32, 32] pixel values of a fixed random 48x40 image."""
    torch.manual_seed(4)
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
    return _clip_processor()(image, return_tensors="pt").pixel_values


@torch.no_grad()
def _reference_logits(original, pixel_values: torch.Tensor, keep_cls: bool = False) -> torch.Tensor:
    """Logits [S, VOCAB] computed directly from the original weights, without transformers' LLaVA."""
    tower = CLIPVisionModel.from_pretrained(original["tower"]).eval()
    layer = tower(pixel_values, output_hidden_states=True).hidden_states[-2][0]  # [1 + 64, 32]
    patches = layer if keep_cls else layer[1:]  # "cls_patch" keeps CLS, "patch" drops it
    w = original["projector"]
    hidden = F.gelu(F.linear(patches, w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"]))
    features = F.linear(hidden, w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"])  # [64, 64]
    ids = torch.tensor(_prompt_ids(original["checkpoint"]))
    split = int((ids == ORIGINAL_IMAGE_ID).nonzero())
    embed = original["llama"].model.embed_tokens
    embeds = torch.cat([embed(ids[:split]), features, embed(ids[split + 1:])])[None]  # [1, S, 64]
    return original["llama"](inputs_embeds=embeds).logits[0]


def _expanded_ids(original, image_token_id: int, image_tokens: int = N_PATCHES) -> torch.Tensor:
    ids = []
    for token in _prompt_ids(original["checkpoint"]):
        ids += [image_token_id] * image_tokens if token == ORIGINAL_IMAGE_ID else [token]
    return torch.tensor([ids])


@torch.no_grad()
def _converted_logits(model, original, pixel_values, image_tokens: int = N_PATCHES) -> torch.Tensor:
    ids = _expanded_ids(original, model.config.image_token_id, image_tokens)
    return model(input_ids=ids, pixel_values=pixel_values).logits[0]


def test_logits_match_direct_computation(original, converted):
    model, processor = converted
    pixel_values = _pixel_values()
    expected = _reference_logits(original, pixel_values)
    logits = _converted_logits(model, original, pixel_values)
    assert logits.shape == (expected.shape[0], VOCAB + 1)  # + <image>; the tokenizer already has a pad token
    torch.testing.assert_close(logits[:, :VOCAB], expected, atol=1e-4, rtol=1e-4)
    assert model.config.text_config.rms_norm_eps == 1e-5
    assert (model.config.image_aspect_ratio, model.config.mm_use_im_start_end) == ("pad", False)


def test_processor_expands_image_and_matches_tower_preprocessing(converted):
    model, processor = converted
    image = Image.new("RGB", (40, 48), (200, 30, 30))
    batch = processor(text="USER: <image>\nWhat colour? ASSISTANT:", images=image, return_tensors="pt")
    assert int((batch.input_ids == model.config.image_token_id).sum()) == N_PATCHES
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == VOCAB
    torch.testing.assert_close(batch.pixel_values, _clip_processor()(image, return_tensors="pt").pixel_values)


def test_detects_original_format(original, tmp_path):
    save_tiny_llava(tmp_path / "llava-hf")
    (tmp_path / "no-arch").mkdir()
    _write_json(tmp_path / "no-arch" / "config.json", {"model_type": "llava", "mm_vision_tower": "x/y"})
    assert is_original_checkpoint(str(original["checkpoint"]))
    assert is_original_checkpoint(str(tmp_path / "no-arch"))
    assert not is_original_checkpoint(str(tmp_path / "llava-hf"))
    assert not is_original_checkpoint(str(tmp_path / "missing"))


def test_cli_writes_directory_that_loads_with_same_logits(original, tmp_path):
    destination = tmp_path / "converted"
    assert convert_main([str(original["checkpoint"]), str(destination)]) == 0
    model = LlavaForConditionalGeneration.from_pretrained(destination).eval()
    processor = AutoProcessor.from_pretrained(destination)
    pixel_values = _pixel_values()
    torch.testing.assert_close(_converted_logits(model, original, pixel_values)[:, :VOCAB],
                               _reference_logits(original, pixel_values), atol=1e-4, rtol=1e-4)
    assert model.config.image_aspect_ratio == "pad" and model.config.mm_use_im_start_end is False
    assert model.generation_config.suppress_tokens == [VOCAB]
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert not is_original_checkpoint(str(destination))
    assert (destination / "tokenizer.model").is_file()  # the sentencepiece model, for original-style tokenisation
    with pytest.raises(ValueError, match="not an empty directory"):
        convert_original_checkpoint(str(original["checkpoint"]), str(destination))


def test_added_tokens_never_win_in_generation(converted, original):
    model, _ = converted
    pixel_values = _pixel_values()
    ids = _expanded_ids(original, model.config.image_token_id)
    added = model.generation_config.suppress_tokens
    lm_head = model.lm_head.weight
    saved = lm_head.detach().clone()
    try:
        with torch.no_grad():  # give the added rows 10x the logit of the current winner
            top = int(model(input_ids=ids, pixel_values=pixel_values).logits[0, -1].argmax())
            lm_head[added] = 10 * lm_head[top]
            raw = model(input_ids=ids, pixel_values=pixel_values).logits[0, -1]
        assert int(raw.argmax()) in added  # without suppression an added token would be chosen
        for sample in (False, True):
            out = model.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=4, min_new_tokens=4, do_sample=sample)
            assert not set(out[0, ids.shape[1]:].tolist()) & set(added)
    finally:
        with torch.no_grad():
            lm_head.copy_(saved)


def test_projector_only_checkpoint_with_model_base(original, tmp_path):
    base, projector_only, tower = tmp_path / "vicuna-tiny", tmp_path / "llava-pretrain-tiny", tmp_path / "tower"
    original["llama"].save_pretrained(base)  # a plain Llama checkpoint (safetensors)
    _write_tokenizer(base, with_pad=False)
    projector_only.mkdir(), tower.mkdir()
    torch.save(original["projector"], projector_only / "mm_projector.bin")
    _write_json(projector_only / "config.json", _original_config("openai/clip-vit-large-patch14-336"))
    for name in ("config.json", "model.safetensors"):  # a tower without preprocessor_config.json: CLIP defaults
        shutil.copy(original["tower"] / name, tower / name)

    with pytest.raises(ValueError, match="--model-base"):
        load_original_checkpoint(str(projector_only), vision_tower=str(tower))
    model, processor = load_original_checkpoint(str(projector_only), model_base=str(base), vision_tower=str(tower))
    pixel_values = _pixel_values()
    torch.testing.assert_close(_converted_logits(model, original, pixel_values)[:, :VOCAB],
                               _reference_logits(original, pixel_values), atol=1e-4, rtol=1e-4)
    assert model.generation_config.suppress_tokens == [VOCAB, VOCAB + 1]  # <image>, <pad>
    assert processor.tokenizer.pad_token == "<pad>"
    image = Image.new("RGB", (40, 48), (10, 200, 30))
    torch.testing.assert_close(processor.image_processor(image, return_tensors="pt").pixel_values,
                               _clip_processor(CLIP_MEAN, CLIP_STD)(image, return_tensors="pt").pixel_values)


def _variant(original, tmp_path, config_changes=None, drop_fields=(), remove=(), add=()):
    """A copy of the tiny checkpoint with config fields changed or dropped, files removed or (empty) files added."""
    copy = tmp_path / "variant"
    shutil.copytree(original["checkpoint"], copy)
    config = {**json.loads((copy / "config.json").read_text()), **(config_changes or {})}
    _write_json(copy / "config.json", {key: value for key, value in config.items() if key not in drop_fields})
    for name in remove:
        (copy / name).unlink()
    for name in add:
        (copy / name).write_text("{}")
    return str(copy)


@pytest.mark.parametrize(
    ("variant", "keep_cls", "suppressed", "aspect"),
    [
        ({"config_changes": {"mm_vision_select_feature": "cls_patch"}}, True, [VOCAB], "pad"),
        # the original builder adds <im_patch> (id 300) before the image token is appended (id 301)
        ({"config_changes": {"mm_use_im_patch_token": True}}, False, [VOCAB, VOCAB + 1], "pad"),
        # absent fields: rms_norm_eps defaults to LLaVA-1.5's 1e-5, no image_aspect_ratio means plain CLIP resize
        ({"drop_fields": ["rms_norm_eps", "image_aspect_ratio"]}, False, [VOCAB], "square"),
    ],
)
def test_config_variants_keep_logits(original, tmp_path, variant, keep_cls, suppressed, aspect):
    model, processor = load_original_checkpoint(_variant(original, tmp_path, **variant))
    image_tokens = N_PATCHES + keep_cls
    batch = processor(text="USER: <image>\nWhat?", images=Image.new("RGB", (32, 32)), return_tensors="pt")
    assert int((batch.input_ids == model.config.image_token_id).sum()) == image_tokens
    pixel_values = _pixel_values()
    torch.testing.assert_close(_converted_logits(model, original, pixel_values, image_tokens)[:, :VOCAB],
                               _reference_logits(original, pixel_values, keep_cls), atol=1e-4, rtol=1e-4)
    assert model.generation_config.suppress_tokens == suppressed
    assert model.config.image_token_id == suppressed[-1]
    assert model.config.image_aspect_ratio == aspect


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"config_changes": {"mm_projector_type": "linear"}}, "mm_projector_type='linear'"),
        ({"config_changes": {"mm_projector_type": "mlp3x_gelu"}}, "mm_projector_type='mlp3x_gelu'"),
        ({"config_changes": {"mm_use_im_start_end": True}}, "mm_use_im_start_end"),
        ({"config_changes": {"mm_vision_select_feature": "cls"}}, "mm_vision_select_feature='cls'"),
        ({"config_changes": {"mm_vision_tower": "/nonexistent/clip"}}, "vision tower"),
        ({"config_changes": {"mm_vision_tower": None}}, "no mm_vision_tower"),
        ({"add": ["adapter_config.json"]}, "LoRA"),
        ({"remove": ["pytorch_model-00002-of-00002.bin"]}, "missing"),
        ({"remove": ["pytorch_model.bin.index.json"]}, "no weight files"),
        ({"remove": ["tokenizer.model"]}, "no tokenizer"),
    ],
)
def test_unsupported_inputs_raise_clear_errors(original, tmp_path, variant, message):
    with pytest.raises(ValueError, match=message):
        load_original_checkpoint(_variant(original, tmp_path, **variant))


def test_cli_reports_bad_input_without_traceback(original, tmp_path, capsys):
    source = _variant(original, tmp_path, config_changes={"mm_projector_type": "identity"})
    with pytest.raises(SystemExit) as exit_info:
        convert_main([source, str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "mm_projector_type='identity'" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()

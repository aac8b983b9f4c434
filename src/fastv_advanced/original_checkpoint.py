"""Original-format LLaVA-1.5 checkpoints (haotian-liu/LLaVA, e.g. `liuhaotian/llava-v1.5-7b`) as transformers' LLaVA.

The original repository stores a `LlavaLlamaForCausalLM`: a Llama checkpoint with flat config fields, a
`model.mm_projector` and the name of a CLIP vision tower whose weights live elsewhere. This module reads such a
directory and builds the equivalent `LlavaForConditionalGeneration` + `LlavaProcessor` in memory, or writes them
as a transformers-format directory. It only does I/O and name mapping; `docs/original_checkpoints.md` has the
full field and weight-name table and what is (not) supported.

Weight names (original -> transformers 5.x):

    model.embed_tokens.* / model.layers.N.* / model.norm.*  ->  model.language_model.<same>
    lm_head.weight                                         ->  lm_head.weight
    model.mm_projector.0.* / model.mm_projector.2.*        ->  model.multi_modal_projector.linear_1.* / linear_2.*
    CLIPVisionModel(mm_vision_tower).state_dict()          ->  model.vision_tower.<same>
    model.vision_tower.vision_tower.*, *rotary_emb.inv_freq  ignored (as the original loader does)

The original vocabulary has no image token (image features are spliced in at id -200). `<image>` (and `<pad>`
when the tokenizer has no pad token) are appended; their embedding and `lm_head` rows are the mean of the
trained rows, and every id without a trained row is listed in `generation_config.suppress_tokens`, so
`generate` can never emit it while logits over the trained vocabulary are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

ORIGINAL_ARCHITECTURE = "LlavaLlamaForCausalLM"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IM_PATCH_TOKEN = "<im_patch>"  # added by the original builder when `mm_use_im_patch_token` is true

SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
SUPPORTED_PROJECTOR = "mlp2x_gelu"
ASPECT_RATIOS = {"pad": "pad", "square": "square", None: "square"}

_LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.")
_PROJECTOR_PREFIX = "model.mm_projector."
_PROJECTOR_NAMES = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                    "2.bias": "linear_2.bias"}
_IGNORED_PREFIX = "model.vision_tower."
_IGNORED_SUFFIX = "rotary_emb.inv_freq"

_WEIGHT_INDEXES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
_PROJECTOR_FILE = "mm_projector.bin"
_LORA_FILES = ("adapter_config.json", "non_lora_trainables.bin")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

# CLIP ViT-L/14-336 preprocessing, used when the vision tower directory has no preprocessor_config.json.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ----------------------------------------------------------------------------------------------------------------
# Format detection and config checks
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_original_checkpoint(path: str) -> bool:
    """True when `path` is a local directory whose config.json is in the original LLaVA format.

    The original format is recognised by `architectures` containing `LlavaLlamaForCausalLM` or by the presence of
    `mm_vision_tower`; `model_type` is "llava" in both formats and so cannot tell them apart. Never touches the
    network.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = _read_json(config_file)
    except (OSError, json.JSONDecodeError):
        return False
    return ORIGINAL_ARCHITECTURE in (config.get("architectures") or []) or "mm_vision_tower" in config


def _check_supported(config: dict) -> None:
    """Raise ValueError naming the option for anything that has no equivalent in transformers' LLaVA."""
    architectures = config.get("architectures") or [ORIGINAL_ARCHITECTURE]
    if ORIGINAL_ARCHITECTURE not in architectures:
        raise ValueError(f"architectures={architectures}: only {ORIGINAL_ARCHITECTURE} (Llama decoder) is supported")
    projector = config.get("mm_projector_type", "linear")  # the original builder's default is "linear"
    if projector != SUPPORTED_PROJECTOR:
        raise ValueError(
            f"mm_projector_type={projector!r} is not supported: only {SUPPORTED_PROJECTOR!r} maps onto transformers' "
            "two-layer LLaVA projector (linear_1, GELU, linear_2)"
        )
    if config.get("mm_use_im_start_end", False):
        raise ValueError(
            "mm_use_im_start_end=true is not supported: transformers' LLaVA has no <im_start>/<im_end> tokens "
            "around the image; only mm_use_im_start_end=false checkpoints (LLaVA-1.5) can be converted"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ValueError(
            f"mm_vision_select_feature={feature!r} is not supported (supported: {sorted(SELECT_FEATURE_TO_STRATEGY)})"
        )
    if "mm_vision_select_layer" not in config:
        raise ValueError("mm_vision_select_layer is missing from config.json")
    aspect = config.get("image_aspect_ratio")
    if aspect not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio={aspect!r} is not supported (supported: 'pad', 'square')")
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ValueError(f"mm_patch_merge_type={merge!r} is not supported (LLaVA-NeXT); only 'flat' is")
    if config.get("rope_scaling") is not None:
        raise ValueError(f"rope_scaling={config['rope_scaling']!r} is not supported; only plain RoPE (null) is")


def _read_original_config(src: Path) -> dict:
    if not src.is_dir():
        raise ValueError(f"{src} is not a local directory")
    if not is_original_checkpoint(str(src)):
        raise ValueError(
            f"{src} is not an original-format LLaVA checkpoint (config.json has neither architectures "
            f"[{ORIGINAL_ARCHITECTURE!r}] nor mm_vision_tower); transformers-format directories load directly "
            "with LlavaForConditionalGeneration.from_pretrained"
        )
    config = _read_json(src / "config.json")
    _check_supported(config)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Weight files and name mapping
# ----------------------------------------------------------------------------------------------------------------


def _weight_files(directory: Path) -> list[Path]:
    """The model weight files of `directory`: the shards named by an index, else a single file; [] if none."""
    for index in _WEIGHT_INDEXES:
        if (directory / index).is_file():
            shards = sorted(set(_read_json(directory / index)["weight_map"].values()))
            missing = [name for name in shards if not (directory / name).is_file()]
            if missing:
                raise ValueError(f"{directory / index} names weight files that are missing: {missing}")
            return [directory / name for name in shards]
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    return []


def _load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read `.bin` (torch.load, weights only, memory-mapped) and `.safetensors` files into one name -> tensor dict."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            tensors.update(load_file(file))
        else:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return tensors


def _is_ignored(name: str) -> bool:
    return name.startswith(_IGNORED_PREFIX) or name.endswith(_IGNORED_SUFFIX)


def _split_original_weights(tensors: dict[str, torch.Tensor], source: Path) -> tuple[dict, dict]:
    """Split original names into (Llama weights with their original names, projector weights by transformers name).

    Llama weights keep `model.embed_tokens.*`, `model.layers.N.*`, `model.norm.*`, `lm_head.*` (the names a plain
    `LlamaForCausalLM` uses); projector weights are renamed to `linear_1.*`/`linear_2.*`. Unknown names raise
    ValueError rather than being dropped silently.
    """
    llm, projector, unknown = {}, {}, []
    for name, tensor in tensors.items():
        if name.startswith(_LLM_PREFIXES) or name.startswith("lm_head."):
            llm[name] = tensor
        elif name.startswith(_PROJECTOR_PREFIX) and name[len(_PROJECTOR_PREFIX):] in _PROJECTOR_NAMES:
            projector[_PROJECTOR_NAMES[name[len(_PROJECTOR_PREFIX):]]] = tensor
        elif not _is_ignored(name):
            unknown.append(name)
    if unknown:
        raise ValueError(f"{source}: weights with no transformers equivalent: {sorted(unknown)[:8]}")
    return llm, projector


def _resize_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Truncate `weight` [V, d] to `rows` rows, or append rows equal to the mean of its rows: [rows, d]."""
    if rows <= weight.shape[0]:
        return weight[:rows]
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def _llava_state_dict(
    llm: dict[str, torch.Tensor], projector: dict[str, torch.Tensor], vision: dict[str, torch.Tensor], vocab: int
) -> dict[str, torch.Tensor]:
    """Transformers names for all weights; embedding and lm_head resized to `vocab` rows ([vocab, hidden])."""
    state = {}
    for name, tensor in llm.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = _resize_rows(tensor, vocab)
        new_name = name if name.startswith("lm_head.") else "model.language_model." + name[len("model."):]
        state[new_name] = tensor
    state.update({f"model.multi_modal_projector.{name}": tensor for name, tensor in projector.items()})
    state.update({f"model.vision_tower.{name}": tensor for name, tensor in vision.items()})
    return state


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint kinds: full, projector-only (+ model_base), LoRA (rejected)
# ----------------------------------------------------------------------------------------------------------------


def _local_dir(path: str, option: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"{option} {path!r} is not a local directory (download it first)")
    return directory


def _read_weights(src: Path, model_base: str | None) -> tuple[dict, dict, Path]:
    """(Llama weights, projector weights, directory holding the tokenizer) for a full or projector-only checkpoint.

    Full checkpoint: everything from `src`. Projector-only (`mm_projector.bin`, as saved by LLaVA's pretraining
    stage): the Llama weights and tokenizer come from `model_base` (original-format or plain Llama directory), the
    projector from `src/mm_projector.bin` — the original builder's `model_base` branch.
    """
    if any((src / name).is_file() for name in _LORA_FILES):
        raise ValueError(
            f"{src} is a LoRA checkpoint ({' / '.join(_LORA_FILES)}): LoRA weights are not supported, merge them "
            "first (LLaVA's scripts/merge_lora_weights.py) and convert the merged directory. Supported: full "
            "checkpoints, and projector-only checkpoints (mm_projector.bin) with --model-base"
        )
    if model_base is None:
        files = _weight_files(src)
        if not files:
            hint = " (projector-only checkpoint: pass --model-base)" if (src / _PROJECTOR_FILE).is_file() else ""
            raise ValueError(f"no weight files in {src}: expected {' or '.join(_WEIGHT_INDEXES + _WEIGHT_FILES)}{hint}")
        llm, projector = _split_original_weights(_load_tensors(files), src)
        return llm, projector, src
    base = _local_dir(model_base, "--model-base")
    if not (src / _PROJECTOR_FILE).is_file():
        raise ValueError(
            f"--model-base was given but {src} has no {_PROJECTOR_FILE}: --model-base is only for projector-only "
            "checkpoints; omit it to convert a full checkpoint"
        )
    base_files = _weight_files(base)
    if not base_files:
        raise ValueError(f"no weight files in --model-base {base}")
    llm, _ = _split_original_weights(_load_tensors(base_files), base)
    _, projector = _split_original_weights(_load_tensors([src / _PROJECTOR_FILE]), src / _PROJECTOR_FILE)
    return llm, projector, base


def _check_weights(llm: dict, projector: dict, source: Path) -> None:
    missing = [name for name in ("model.embed_tokens.weight", "lm_head.weight") if name not in llm]
    missing += [f"{_PROJECTOR_PREFIX}{key}" for key, name in _PROJECTOR_NAMES.items() if name not in projector]
    if missing:
        raise ValueError(f"weights missing from {source}: {missing}")


# ----------------------------------------------------------------------------------------------------------------
# Vision tower, tokenizer, processor, configs
# ----------------------------------------------------------------------------------------------------------------


def _vision_tower_source(config: dict, vision_tower: str | None) -> str:
    """Local directory or hub id of the CLIP tower: the `vision_tower` override, else `mm_vision_tower`."""
    name = vision_tower or config.get("mm_vision_tower") or config.get("vision_tower")
    if not name:
        raise ValueError("config.json has no mm_vision_tower: pass the CLIP vision tower with --vision-tower")
    path = Path(name).expanduser()
    looks_like_hub_id = not path.is_absolute() and not name.startswith((".", "~")) and name.count("/") == 1
    if path.is_dir():
        return str(path)
    if looks_like_hub_id:
        return name
    raise ValueError(f"vision tower {name!r} not found: pass a local CLIP directory or hub id with --vision-tower")


def _load_vision_tower(source: str, dtype: torch.dtype, projector_width: int) -> CLIPVisionModel:
    """CLIPVisionModel from a local directory (no network) or a hub id (transformers' normal cache).

    Its hidden size must equal the projector's input width (the original `mm_hidden_size`).
    """
    try:
        tower = CLIPVisionModel.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise ValueError(
            f"cannot load the vision tower {source!r} ({error}); pass a local copy with --vision-tower"
        ) from error
    if tower.config.hidden_size != projector_width:
        raise ValueError(
            f"vision tower {source!r} has hidden size {tower.config.hidden_size} but the projector expects "
            f"{projector_width} (mm_hidden_size): pass the matching tower with --vision-tower"
        )
    return tower


def _image_processor(source: str, image_size: int) -> CLIPImageProcessorPil:
    """The tower's CLIP preprocessing (preprocessor_config.json), else CLIP defaults at the tower's image size.

    `CLIPImageProcessorPil` is chosen deliberately: it needs no torchvision and is the PIL/numpy implementation the
    original's `CLIPImageProcessor` (transformers 4.3x) was, whereas the torchvision backend can differ slightly.
    Padding to a square (`image_aspect_ratio == "pad"`) is the caller's step, before this processor.
    """
    local = Path(source)
    if not local.is_dir() or (local / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(source)
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_normalize=True,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )


def _load_tokenizer(directory: Path, use_im_patch_token: bool):
    """The checkpoint's tokenizer plus the tokens the original builder adds (`<im_patch>` when configured)."""
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {directory}: expected {' or '.join(_TOKENIZER_FILES)}")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if use_im_patch_token:
        tokenizer.add_tokens([IM_PATCH_TOKEN], special_tokens=True)
    return tokenizer


def _add_llava_tokens(tokenizer) -> None:
    """Append `<image>` (and `<pad>` if the tokenizer has no pad token), as llava-hf checkpoints have them."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def _text_config(config: dict, vocab_size: int, tokenizer) -> LlamaConfig:
    """LlamaConfig from the flat original fields (rms_norm_eps defaults to 1e-5, LLaVA-1.5's value)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)},
        attention_bias=config.get("attention_bias", False),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _llava_config(config: dict, text: LlamaConfig, vision: CLIPVisionModel, image_token_id: int) -> LlavaConfig:
    """LlavaConfig; `image_aspect_ratio` and `mm_use_im_start_end` ride along as plain attributes."""
    strategy = SELECT_FEATURE_TO_STRATEGY[config.get("mm_vision_select_feature", "patch")]
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    llava = LlavaConfig(
        vision_config=vision.config,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config["mm_vision_select_layer"],
        image_seq_length=patches if strategy == "default" else patches + 1,
        pad_token_id=text.pad_token_id,
        tie_word_embeddings=False,
    )
    llava.image_aspect_ratio = ASPECT_RATIOS[config.get("image_aspect_ratio")]
    llava.mm_use_im_start_end = False
    return llava


def _generation_config(directory: Path, tokenizer, suppress: list[int]) -> GenerationConfig:
    """The checkpoint's generation_config.json (if any) with the untrained ids suppressed at every step."""
    if (directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(directory))
    else:
        generation = GenerationConfig()
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.suppress_tokens = suppress
    return generation


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _build(src: str, model_base, vision_tower, dtype: torch.dtype | None):
    """(model, processor); `dtype=None` keeps the dtype the Llama weights are stored in."""
    source = Path(src).expanduser()
    config = _read_original_config(source)
    llm, projector, tokenizer_dir = _read_weights(source, model_base)
    _check_weights(llm, projector, source)
    dtype = dtype or llm["model.embed_tokens.weight"].dtype

    tower_source = _vision_tower_source(config, vision_tower)
    tower = _load_vision_tower(tower_source, dtype, projector["linear_1.weight"].shape[1])
    tokenizer = _load_tokenizer(tokenizer_dir, config.get("mm_use_im_patch_token", True))
    trained_rows = min(llm["model.embed_tokens.weight"].shape[0], len(tokenizer))
    _add_llava_tokens(tokenizer)

    text = _text_config(config, len(tokenizer), tokenizer)
    llava_config = _llava_config(config, text, tower, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    state = _llava_state_dict(llm, projector, tower.state_dict(), len(tokenizer))
    # from_pretrained casts to `dtype` and reuses tensors already in it (no copy of memory-mapped weights)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        None, config=llava_config, state_dict=state, dtype=dtype, output_loading_info=True
    )
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"weights do not fit the model built from {source / 'config.json'}: {info}")
    model.generation_config = _generation_config(tokenizer_dir, tokenizer, list(range(trained_rows, len(tokenizer))))

    processor = LlavaProcessor(
        image_processor=_image_processor(tower_source, tower.config.image_size),
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    return model.eval(), processor


def load_original_checkpoint(
    path: str,
    model_base: str | None = None,
    vision_tower: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the transformers equivalent of an original-format LLaVA-1.5 checkpoint directory.

    Args:
        path: local directory with the original `config.json`, weights (`pytorch_model-*.bin` + index, or
            safetensors) and sentencepiece tokenizer.
        model_base: for projector-only checkpoints (`mm_projector.bin`): local directory with the Llama weights
            and tokenizer (original-format or plain Llama). LoRA checkpoints raise ValueError (merge them first).
        vision_tower: local CLIP directory or hub id overriding `mm_vision_tower` (e.g. a local copy of
            openai/clip-vit-large-patch14-336). A local path never touches the network.
        dtype: dtype of every weight of the returned model.
        device: device the model is moved to.

    Returns:
        `(model, processor)`. `model.config.image_aspect_ratio` ("pad" or "square") and
        `model.config.mm_use_im_start_end` (always False) carry the original preprocessing options;
        `model.generation_config.suppress_tokens` lists the appended ids (`<image>`, `<pad>`, ...), whose rows are
        the mean of the trained rows. The processor expands `<image>` to `(image_size // patch_size) ** 2` tokens
        (+1 for `cls_patch`).

    Raises:
        ValueError: for anything without a transformers equivalent, naming the option (projector type,
            mm_use_im_start_end, select feature, LoRA, missing weight files, tokenizer or vision tower).
    """
    model, processor = _build(path, model_base, vision_tower, dtype)
    return model.to(device), processor


def convert_original_checkpoint(
    src: str, dst: str, model_base: str | None = None, vision_tower: str | None = None
) -> None:
    """Write `src` (original format) to `dst` as a transformers-format LLaVA directory.

    `dst` receives model safetensors, config.json (with `image_aspect_ratio`/`mm_use_im_start_end`),
    generation_config.json (with `suppress_tokens`) and the processor files, so that
    `LlavaForConditionalGeneration.from_pretrained(dst)` and `AutoProcessor.from_pretrained(dst)` load it. Weights
    keep the dtype the Llama weights are stored in (fp16 for liuhaotian/llava-v1.5-7b). The original sentencepiece
    `tokenizer.model` is copied too, for callers that tokenise the original way (chunks around `<image>`).
    `dst` must not exist or be empty, so that no stale shard is mixed in.
    """
    target = Path(dst).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"destination {dst!r} exists and is not an empty directory")
    model, processor = _build(src, model_base, vision_tower, dtype=None)
    os.makedirs(target, exist_ok=True)
    model.save_pretrained(str(target))
    processor.save_pretrained(str(target))
    sentencepiece_model = Path(getattr(processor.tokenizer, "vocab_file", None) or "")
    if sentencepiece_model.name == "tokenizer.model" and sentencepiece_model.is_file():
        shutil.copy(sentencepiece_model, target / "tokenizer.model")

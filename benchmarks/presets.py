"""What a benchmark run measures on: its presets (shapes, grids, repetitions), the settings a command line resolves
to, and the random-weight LLaVA-1.5-layout model and prompt they build."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

GRID_K = (1, 2, 3)
GRID_RANKS = (576, 432, 288, 144, 72, 0)  # for 576 image tokens; scaled proportionally for other image sizes
IMAGE_TOKEN_ID, PAD_TOKEN_ID, BOS, EOS = 32000, 32001, 1, 2


@dataclass
class Preset:
    name: str
    device: str
    dtype: str
    text: dict  # LlamaConfig fields
    vision: dict  # CLIPVisionConfig fields
    n_before_image: int = 35  # BOS + system prompt + "USER:" (DESIGN.md section 5: the image starts at 35)
    n_after_image: int = 60  # question, options, "ASSISTANT:"
    qk_scale: float = 2.0  # random init gives near-uniform attention; sharpen it so rankings are not float noise
    vision_note: str = ""
    # what the default (non-smoke) run measures
    side_by_side_k: tuple = GRID_K  # K values at which mask / eager modes run (drop runs the full grid)
    e2e_k: tuple = (2,)
    e2e_ranks: tuple = GRID_RANKS
    new_tokens: tuple = (1, 32)
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 5
    anchor_every: int = 3  # in prefill rounds, the baseline runs again after every this many configurations
    e2e_min_reps: int = 1
    e2e_max_reps: int = 3
    e2e_warmup: bool = True  # one untimed short generate per configuration before the timed rounds
    time_budget_s: float = 540.0


LLAVA7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32064)
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)

PRESETS = {
    "llava7b": Preset(
        name="llava7b", device="cuda", dtype="float16", text=LLAVA7B_TEXT, vision=CLIP_L336,
        vision_note="CLIP ViT-L/14-336 shapes (24 layers, hidden 1024): cheap next to the 7B decoder on a GPU "
                    "(~4% of prefill FLOPs), so the end-to-end numbers keep LLaVA-1.5's real proportions",
        side_by_side_k=GRID_K, e2e_k=(2,), warmup=2, min_reps=5, max_reps=15, anchor_every=3,
        e2e_min_reps=1, e2e_max_reps=3, time_budget_s=270.0,
    ),
    "scaled": Preset(
        name="scaled", device="cpu", dtype="float32",
        text=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32064),
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=5, num_attention_heads=4,
                    image_size=336, patch_size=14, projection_dim=256),
        vision_note="stand-in CLIP (hidden 256, 5 layers, 336px / patch 14 = 576 tokens) sized so the vision "
                    "tower is ~4% of prefill FLOPs, as CLIP ViT-L/14-336 is for LLaVA-1.5-7B; the real ViT-L would "
                    "cost more than this scaled decoder on a CPU",
        side_by_side_k=(2,), e2e_k=(2,), e2e_ranks=(288, 144), warmup=1, min_reps=3, max_reps=10,
        anchor_every=3, e2e_min_reps=1, e2e_max_reps=3, time_budget_s=480.0,
    ),
    "tiny": Preset(
        name="tiny", device="cpu", dtype="float32",
        text=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32064),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=4, projection_dim=32),
        n_before_image=8, n_after_image=10, qk_scale=4.0,
        vision_note="toy CLIP (32px / patch 4 = 64 image tokens) for tests",
        side_by_side_k=(1, 2), e2e_k=(2,), e2e_ranks=(576, 288, 0), new_tokens=(1, 4), warmup=1, min_reps=1,
        max_reps=2, anchor_every=2, e2e_min_reps=1, e2e_max_reps=1, time_budget_s=60.0,
    ),
}

# --smoke: same code path, smallest grid, one timed round (also shrinks llava7b's widths when run on a CPU)
SMOKE = dict(grid_k=(2,), grid_ranks=(576, 288, 0), side_by_side_k=(2,), e2e_k=(2,), e2e_ranks=(288,),
             new_tokens=(1, 4), warmup=0, e2e_warmup=False, min_reps=1, max_reps=1, anchor_every=2, e2e_min_reps=1, e2e_max_reps=1)
LLAVA7B_CPU_SMOKE_TEXT = dict(LLAVA7B_TEXT, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=2)
LLAVA7B_CPU_SMOKE_VISION = dict(CLIP_L336, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=2, projection_dim=64)


def resolve_preset(args) -> tuple[Preset, torch.device]:
    """The preset and device of a command line (`--preset`, `--device`, `--smoke`); SystemExit when they cannot run."""
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--preset {args.preset} runs on a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). For a CPU crash check use: --preset {args.preset} --device cpu --smoke"
        )
    if args.preset == "llava7b" and device.type == "cpu":
        if not args.smoke:
            raise SystemExit("--preset llava7b on a CPU is only supported with --smoke (7B shapes need a GPU)")
        preset = Preset(**{**preset.__dict__, "text": LLAVA7B_CPU_SMOKE_TEXT, "vision": LLAVA7B_CPU_SMOKE_VISION,
                           "vision_note": "CPU smoke: llava7b code path (fp16, 576 image tokens, vocab 32064) with "
                                          "4 layers x hidden 256 and a 2-layer toy CLIP"})
    return preset, device


def resolve_settings(args, preset: Preset) -> dict:
    """The preset's fields and grids, with --smoke and the command line's overrides applied."""
    settings = {**preset.__dict__}
    settings["grid_k"], settings["grid_ranks"] = GRID_K, GRID_RANKS
    if args.smoke:
        settings.update(SMOKE)
    overrides = dict(grid_k=args.grid_k, grid_ranks=args.grid_ranks, side_by_side_k=args.side_by_side_k,
                     e2e_k=args.e2e_k, e2e_ranks=args.e2e_ranks, new_tokens=args.new_tokens, max_reps=args.reps,
                     min_reps=args.min_reps, e2e_max_reps=args.e2e_reps, time_budget_s=args.time_budget)
    settings.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
    settings["min_reps"] = min(settings["min_reps"], settings["max_reps"])
    settings["e2e_min_reps"] = min(settings["e2e_min_reps"], settings["e2e_max_reps"])
    return settings


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA-1.5-layout model created directly on `device` in `dtype`."""
    vision = CLIPVisionConfig(**preset.vision)
    text = LlamaConfig(**preset.text, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=PAD_TOKEN_ID,
                       bos_token_id=BOS, eos_token_id=EOS)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, pad_token_id=PAD_TOKEN_ID)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(preset.qk_scale)
            layer.self_attn.k_proj.weight.mul_(preset.qk_scale)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    model.generation_config = GenerationConfig(do_sample=False, bos_token_id=BOS, eos_token_id=EOS,
                                               pad_token_id=PAD_TOKEN_ID)
    return model.eval()


def image_token_count(model) -> int:
    """Image tokens per picture: (image size / patch size)^2."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def build_inputs(model, preset: Preset, device: torch.device, dtype: torch.dtype, batch: int, seed: int) -> dict:
    """[BOS, system + "USER:" ids, 576 x <image>, question ids]: input_ids, attention_mask, pixel_values."""
    vision = model.config.vision_config
    n_image = image_token_count(model)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        before = torch.randint(3, IMAGE_TOKEN_ID, (preset.n_before_image - 1,), generator=g)
        after = torch.randint(3, IMAGE_TOKEN_ID, (preset.n_after_image,), generator=g)
        rows.append(torch.cat([torch.tensor([BOS]), before, torch.full((n_image,), IMAGE_TOKEN_ID), after]))
    input_ids = torch.stack(rows).to(device)
    pixel_values = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g).to(device, dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}

"""`fastv_llava`: an lmms-eval model that evaluates any supported checkpoint with any pruning method of this project.

With the optional extra installed (`pip install -e ".[lmms-eval]"`), lmms-eval finds the model through the
`lmms_eval.models` entry point:

    python -m lmms_eval --model fastv_llava --tasks scienceqa_img \\
        --model_args pretrained=PATH,pruning_method=fastv,agg_layer=2,attention_rank=288,token_selection_method=max_head

`pretrained` is a checkpoint folder (or a cached hub id) of any family `load_model` supports; `pruning_method` is a
method name (`fastv`, `pdrop`, `dart`, ...; none: the unpruned baseline) and every other model argument not listed
below is one of its parameters, as `--pruning-param` takes them. `device` and `dtype` are as in `eval_scivqa.py`.

Each request is the task's text (lmms-eval's `doc_to_text`, e.g. scienceqa_img's question, options and answer
instruction) with its images: LLaVA-1.5 wraps it in the guide's vicuna_v1 prompt with `<image>` first, the other
families in their chat template, both through `prompting.prompts_for` as the project's own evaluation does. Greedy
decoding (or sampling with the task's temperature), one request per `generate`, the pruning hooks installed for the
whole call, each request reseeded from its task and document id (`run_loop.sample_seed`).
"""

from __future__ import annotations

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm

from .methods import build_method
from .model_loading import load_model
from .prompting import pad_token_id_of, prompts_for
from .run_config import RunConfig
from .run_loop import device_inputs, sample_seed

MODEL_ID = "fastv_llava"
_OWN_ARGUMENTS = {"batch_size", "device", "dtype", "max_batch_size"}


def manifest() -> ModelManifest:
    """The entry point's payload: where lmms-eval finds the model class."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.FastVLlava")


class FastVLlava(lmms):
    """lmms-eval's `generate_until` over a loaded checkpoint with a pruning method installed."""

    is_simple = True

    def __init__(self, pretrained: str, pruning_method: str | None = None, device: str = "auto",
                 dtype: str = "auto", seed: int = 0, **kwargs) -> None:
        super().__init__()
        method_params = {key: str(value) for key, value in kwargs.items() if key not in _OWN_ARGUMENTS}
        if pruning_method in (None, "", "none", "baseline"):
            if method_params:
                raise ValueError(f"fastv_llava: {sorted(method_params)} given without pruning_method")
            method = None
        else:
            method = build_method(str(pruning_method), method_params)
        loaded = load_model(str(pretrained), device=str(device), dtype=str(dtype), progress=False)
        self.model, self.processor, self.info = loaded.model, loaded.processor, loaded.info
        self.run_config = RunConfig(method=method, single_pred_prompt=False, seed=int(seed))
        self.prompts = prompts_for(self.model.config, self.processor, self.run_config)
        parameter = next(self.model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        pruner = self.run_config.apply(self.model)
        try:
            for request in tqdm(requests, desc="fastv_llava", disable=self.rank != 0):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                images = [image for image in (visuals or []) if image is not None]
                if len(images) > 1:
                    raise ValueError(f"fastv_llava: document {doc_id} of {task} has {len(images)} images; one per "
                                     "request is supported")
                image = images[0] if images else None
                if pruner is not None:
                    pruner.reseed(sample_seed(self.run_config.seed, f"{task}/{doc_id}"))
                answer = self._generate(context, image, dict(gen_kwargs))
                answers.append(answer)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        finally:
            if pruner is not None:
                pruner.remove()
        return answers

    def _generate(self, context: str, image, gen_kwargs: dict) -> str:
        """One answer: the prompt built around `context` (with `image`, or text only), decoded up to the first
        `until` string."""
        _, _, inputs = self.prompts.encode(context, image, image is not None)
        inputs = device_inputs(inputs, self.device, self.dtype)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        generation = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)), "do_sample": temperature > 0,
                      "pad_token_id": pad_token_id_of(self.processor.tokenizer)}
        if temperature > 0:
            generation["temperature"] = temperature
        with torch.inference_mode():
            output = self.model.generate(**inputs, **generation)
        text = self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("fastv_llava answers generate_until tasks only (e.g. scienceqa_img)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fastv_llava answers single-round generate_until tasks only")

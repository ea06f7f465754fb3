"""SDXL's prompt encoder: CLIP-L and OpenCLIP-bigG, penultimate hidden states side by
side, and bigG's pooled (projected) embedding, as StableDiffusionXLPipeline.encode_prompt
computes them (no clip_skip, no textual inversion)."""

import json
import time
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from serve_app.engine.cancel import CancelToken
from serve_app.errors import PromptTooLong
from serve_app.messages import GenerationParams

# StableDiffusionXLPipeline's rule: classifier-free guidance above this guidance_scale.
GUIDANCE_ABOVE = 1.0


def uses_guidance(params: GenerationParams) -> bool:
    """StableDiffusionXLPipeline's rule: classifier-free guidance for guidance_scale > 1."""
    return params.guidance_scale > GUIDANCE_ABOVE


class SDXLEncoder:
    """Prompt -> {"prompt_embeds": [77, 2048], "pooled": [1280]} and, with guidance,
    "negative_prompt_embeds" and "negative_pooled" (sizes of SDXL base), on the CPU.

    Args:
        tokenizers: CLIP-L's and bigG's tokenizers (77 tokens each, bigG pads with "!").
        text_encoders: CLIPTextModel and CLIPTextModelWithProjection.
        device: where they run.
        force_zeros_for_empty_prompt: without a negative prompt, guidance steers away
            from zeros instead of from an encoded "" (SDXL base's model_index.json says so).
    """

    family = "sdxl"

    def __init__(
        self,
        tokenizers: tuple,
        text_encoders: tuple,
        device: torch.device,
        force_zeros_for_empty_prompt: bool = True,
    ):
        self.tokenizers = tokenizers
        self.text_encoders = tuple(
            te.to(device).eval().requires_grad_(False) for te in text_encoders
        )
        self.device = device
        self.force_zeros = force_zeros_for_empty_prompt
        # Longer prompts are refused, not truncated as the stock pipeline does.
        self.max_tokens = min(t.model_max_length for t in tokenizers)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return list(self.text_encoders)

    @classmethod
    def from_pretrained(
        cls, path: Path, device: torch.device, dtype: torch.dtype, prepare=None
    ) -> "SDXLEncoder":
        """Load both tokenizers and text encoders from a diffusers-format SDXL folder.

        Args:
            prepare: called with each text encoder and `device` as loaded, on the CPU,
                before it moves to `device` (the int8 weights' quantisation).
        """
        tokenizers = tuple(
            CLIPTokenizer.from_pretrained(path / sub, local_files_only=True)
            for sub in ("tokenizer", "tokenizer_2")
        )
        text_encoders = (
            CLIPTextModel.from_pretrained(
                path / "text_encoder", dtype=dtype, local_files_only=True
            ),
            CLIPTextModelWithProjection.from_pretrained(
                path / "text_encoder_2", dtype=dtype, local_files_only=True
            ),
        )
        if prepare is not None:
            for text_encoder in text_encoders:
                prepare(text_encoder, device)
        index = json.loads((path / "model_index.json").read_text())
        return cls(
            tokenizers, text_encoders, device, index.get("force_zeros_for_empty_prompt", True)
        )

    def warmup(self) -> float:
        """Encode once alone and once with a negative prompt; returns the seconds taken."""
        start = time.perf_counter()
        self.encode("warm-up prompt", None, with_negative=False)
        self.encode("warm-up prompt", "warm-up negative", with_negative=True)
        return round(time.perf_counter() - start, 3)

    def token_ids(self, text: str, param: str = "prompt") -> list[int]:
        """CLIP-L's token ids of `text` (start and end tokens included, no padding);
        raises PromptTooLong past 77, where the stock pipeline would cut the prompt."""
        ids = self.tokenizers[0](text)["input_ids"]
        longest = max(len(ids), len(self.tokenizers[1](text)["input_ids"]))
        if longest > self.max_tokens:
            raise PromptTooLong(param, longest, self.max_tokens)
        return ids

    def encode_params(
        self, params: GenerationParams, cancel: CancelToken | None = None
    ) -> dict[str, torch.Tensor]:
        """What the denoiser needs for `params`."""
        return self.encode(params.prompt, params.negative_prompt, uses_guidance(params), cancel)

    @torch.no_grad()
    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        with_negative: bool,
        cancel: CancelToken | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the prompt and, for guidance, the negative prompt (zeros without one,
        when the checkpoint says so; else ""), both through one batch per encoder."""
        texts = [("prompt", prompt)]
        zeros = with_negative and negative_prompt is None and self.force_zeros
        if with_negative and not zeros:
            texts.append(("negative_prompt", negative_prompt or ""))
        for param, text in texts:
            self.token_ids(text, param)
        if cancel is not None:
            cancel.check("encode")
        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                [text for _, text in texts],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = text_encoder(ids.to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projected, pooled output of the encoder with one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).to("cpu")
        pooled = pooled.to("cpu")
        result = {"prompt_embeds": embeds[0], "pooled": pooled[0]}
        if zeros:
            result["negative_prompt_embeds"] = torch.zeros_like(embeds[0])
            result["negative_pooled"] = torch.zeros_like(pooled[0])
        elif with_negative:
            result["negative_prompt_embeds"] = embeds[1]
            result["negative_pooled"] = pooled[1]
        return result

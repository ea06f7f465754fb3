"""Z-Image's prompt encoder: Qwen3 `hidden_states[-2]` at the prompt's real length."""

import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from serve_app.engine.cancel import CancelToken
from serve_app.engine.graphs import CudaGraphs
from serve_app.errors import PromptTooLong
from serve_app.messages import GenerationParams

# The stock pipeline's max_sequence_length. Longer prompts are refused, not truncated.
MAX_PROMPT_TOKENS = 512


# ZImagePipeline's rule: classifier-free guidance above this guidance_scale.
GUIDANCE_ABOVE = 0.0


def uses_guidance(params: GenerationParams) -> bool:
    """ZImagePipeline's rule: classifier-free guidance for any guidance_scale > 0."""
    return params.guidance_scale > GUIDANCE_ABOVE


def chat_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the stock pipeline renders it: one user turn, generation
    prompt, thinking on."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    return tokenizer(rendered, add_special_tokens=True)["input_ids"]


class ZImageEncoder:
    """Prompt -> {"prompt": [tokens, hidden], "negative": [tokens, hidden]} on the CPU.

    Args:
        tokenizer: the checkpoint's tokenizer, with its chat template.
        text_encoder: a Qwen3 model.
        device: where the text encoder runs.
        max_tokens: longest accepted prompt, chat template included.
        cuda_graphs: replay the forward from CUDA graphs, one per (batch, length bucket),
            captured by `warmup`. A short prompt's forward is bound by
            kernel launches, not by arithmetic: on an H200 the 4B encoder took 31-37 ms
            eagerly for 65 tokens (*levers-1*, *levers-2*), 9 ms replayed (*bench-6*).
            Default: on CUDA.
    """

    family = "zimage"
    # Sequence lengths a graph is captured for; a prompt is padded up to the next one.
    GRAPH_LENGTHS = (64, 128, 256, 512)

    def __init__(
        self,
        tokenizer,
        text_encoder,
        device: torch.device,
        max_tokens=MAX_PROMPT_TOKENS,
        cuda_graphs: bool | None = None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.device = device
        self.max_tokens = max_tokens
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs = CudaGraphs(device) if self.cuda_graphs else None

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The weights this encoder holds on its device."""
        return [self.text_encoder]

    @classmethod
    def from_pretrained(
        cls,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        prepare=None,
        compile: bool = False,
    ) -> "ZImageEncoder":
        """Load the tokenizer and text encoder from a diffusers-format folder.

        Args:
            prepare: called with the text encoder and `device` as loaded, on the CPU,
                before it moves to `device` (the int8 weights' quantisation).
            compile: torch.compile the text encoder (dynamic shapes). On an H200 it cut
                a 65-token eager forward from 30.8 to 12.4 ms (*levers-2*); the first call
                compiles, see `warmup`.
        """
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        text_encoder = AutoModel.from_pretrained(
            path / "text_encoder", dtype=dtype, local_files_only=True
        )
        if prepare is not None:
            prepare(text_encoder, device)
        if compile:
            text_encoder.compile(dynamic=True)
        return cls(tokenizer, text_encoder, device)

    def warmup(self) -> float:
        """Encode a prompt alone and with a negative prompt (the two batch shapes) and, on
        CUDA, capture every graph, so that no request pays for compilation or capture.
        Returns the seconds taken."""
        start = time.perf_counter()
        self.encode("warm-up prompt", None, with_negative=False)
        self.encode("warm-up prompt", "warm-up negative", with_negative=True)
        if self.cuda_graphs:
            for batch in (1, 2):
                for length in self.GRAPH_LENGTHS:
                    # A fixed shape with no mask: no data-dependent branch, as a capture needs.
                    ids = torch.full((batch, length), self.tokenizer.pad_token_id)
                    if (batch, length) not in self._graphs:
                        self._graphs.capture(
                            (batch, length), self._causal_forward, ids.to(self.device)
                        )
        return round(time.perf_counter() - start, 3)

    def token_ids(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of `text` after the chat template; raises PromptTooLong past the limit."""
        ids = chat_token_ids(self.tokenizer, text)
        if len(ids) > self.max_tokens:
            raise PromptTooLong(param, len(ids), self.max_tokens)
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
        """Encode a prompt (and, for guidance, the negative prompt; "" if None).

        Both go through one forward, right-padded to the longer one. The model is causal,
        so right padding leaves every real token's hidden state as it would be alone.
        Returned tensors are on the CPU, ready to cross to the denoiser's process.
        """
        texts = [("prompt", prompt)]
        if with_negative:
            texts.append(("negative_prompt", negative_prompt or ""))
        ids = [self.token_ids(text, param) for param, text in texts]
        if cancel is not None:
            cancel.check("encode")
        longest = max(len(i) for i in ids)
        length = next((n for n in self.GRAPH_LENGTHS if n >= longest), None)
        if self.cuda_graphs and (len(ids), length) in self._graphs:
            hidden = self._graphs.replay((len(ids), length), self._padded(ids, length))
        else:
            mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
            hidden = self._forward(self._padded(ids, longest), mask.to(self.device))
        embeds = [hidden[row, : len(i)].to("cpu") for row, i in enumerate(ids)]
        out = {"prompt": embeds[0]}
        if with_negative:
            out["negative"] = embeds[1]
        return out

    def _padded(self, ids: list[list[int]], length: int) -> torch.Tensor:
        pad = self.tokenizer.pad_token_id
        return torch.tensor([i + [pad] * (length - len(i)) for i in ids], device=self.device)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.text_encoder(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        ).hidden_states[-2]

    def _causal_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`hidden_states[-2]` without a padding mask and without the layers it does not
        need: the last layer (whose output, like every other layer's, output_hidden_states
        would also keep) and the final norm. The model is causal and the padding comes
        after every real token, so no real token attends to it, as with the mask."""
        model = self.text_encoder
        hidden = model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        rotary = model.rotary_emb(hidden, positions)
        for layer in model.layers[: model.config.num_hidden_layers - 1]:
            hidden = layer(hidden, position_ids=positions, position_embeddings=rotary)
        return hidden

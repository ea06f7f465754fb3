"""Domain exceptions shared by the engine and the HTTP edge.

They carry plain values only, so that they survive pickling across Ray replicas
(Ray re-raises them at the caller as subclasses of the original type). The HTTP
status for each is chosen once, in `serve_app.ingress`.
"""


class Cancelled(Exception):
    """A request stopped because its client left or asked to cancel it.

    Args:
        stage: where it stopped: "queued", "encode", "denoise", "decode" or "encode_image".
        steps_done: denoising steps that ran before it stopped.
        steps_total: denoising steps the request asked for.
    """

    def __init__(self, stage: str, steps_done: int = 0, steps_total: int = 0):
        super().__init__(stage, steps_done, steps_total)
        self.stage, self.steps_done, self.steps_total = stage, steps_done, steps_total

    def __str__(self) -> str:
        return f"cancelled in {self.stage} after {self.steps_done}/{self.steps_total} steps"


class PromptTooLong(ValueError):
    """The prompt (or negative prompt) is longer than the text encoder takes.

    Args:
        param: the request field, "prompt" or "negative_prompt".
        tokens: its length in tokens, chat template included.
        limit: the most tokens the encoder accepts.
    """

    def __init__(self, param: str, tokens: int, limit: int):
        super().__init__(param, tokens, limit)
        self.param, self.tokens, self.limit = param, tokens, limit

    def __str__(self) -> str:
        return (
            f"{self.param} is {self.tokens} tokens long (chat template included); "
            f"the text encoder takes at most {self.limit}. Shorten it."
        )


class DoesNotFit(Exception):
    """The request needs more device memory than the replica has.

    Args:
        width: requested image width.
        height: requested image height.
        num_images: images requested in one call.
        stage: the stage that ran out of memory.
    """

    def __init__(self, width: int, height: int, num_images: int, stage: str):
        super().__init__(width, height, num_images, stage)
        self.width, self.height, self.num_images, self.stage = width, height, num_images, stage

    def __str__(self) -> str:
        return (
            f"{self.num_images} image(s) of {self.width}x{self.height} ran out of GPU memory "
            f"during {self.stage}; ask for a smaller size or fewer images."
        )


class LoraError(ValueError):
    """A request's adapter cannot be used (HTTP 422: the request is well-formed).

    Subclasses pickle by their own arguments (Ray re-raises them at the caller).
    """

    param = "lora.name"
    code = "invalid_lora"

    def __init__(self, *args):
        super().__init__(*args)
        self.message = self.describe(*args)

    def describe(self, *args) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.message


class BadLoraName(LoraError):
    """An adapter name that is not a plain file name; refused before any file is touched.

    Args:
        name: the name asked for.
        reason: what is wrong with it.
    """

    code = "invalid_lora_name"

    def describe(self, name: str, reason: str) -> str:
        shown = name if len(name) <= 40 else name[:40] + "..."
        return (
            f"LoRA name {shown!r} {reason}; use the name of a file in the model's LoRA "
            "folder, without '.safetensors'"
        )


class UnknownLora(LoraError):
    """No adapter of this name in the model's LoRA folder.

    Args:
        name: the name asked for.
        available: the names there are.
    """

    code = "lora_not_found"

    def describe(self, name: str, available: list[str]) -> str:
        listing = ", ".join(available) if available else "none (this model has no LoRAs)"
        return f"LoRA '{name}' is not available for this model; available: {listing}"


class AdapterError(LoraError):
    """An adapter file that cannot be applied to the model: corrupt, not a LoRA, or made
    for another architecture.

    Args:
        file: the file's name.
        reason: why.
    """

    code = "invalid_lora_file"

    def describe(self, file: str, reason: str) -> str:
        return f"LoRA file '{file}' cannot be used: {reason}"

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


class CheckpointError(ValueError):
    """The model setting does not point at a usable checkpoint."""


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
    """The device ran out of memory while the request ran (HTTP 503 with Retry-After:
    the replica freed what it took and stays in service).

    Args:
        width: requested image width.
        height: requested image height.
        num_images: images requested in one call.
        stage: the stage that ran out of memory.
    """

    def __init__(self, width: int, height: int, num_images: int, stage: str):
        super().__init__(width, height, num_images, stage)
        self.width, self.height, self.num_images, self.stage = width, height, num_images, stage

    code = "out_of_memory"
    retry_after_s = 2

    def __str__(self) -> str:
        return (
            f"{self.num_images} image(s) of {self.width}x{self.height} ran out of GPU memory "
            f"during {self.stage}; the memory was freed: retry, or ask for a smaller size or "
            "fewer images."
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


class WillNotFit(Exception):
    """A request predicted to need more device memory than any replica of its model has
    (HTTP 413, refused before any work).

    Args:
        width, height, num_images: what was asked.
        needed_bytes: the predicted peak.
        budget_bytes: the largest replica budget.
        largest_side: the largest square side that fits with the rest as asked (0: none).
    """

    code = "does_not_fit"

    def __init__(self, width, height, num_images, needed_bytes, budget_bytes, largest_side):
        super().__init__(width, height, num_images, needed_bytes, budget_bytes, largest_side)
        self.width, self.height, self.num_images = width, height, num_images
        self.needed_bytes, self.budget_bytes = needed_bytes, budget_bytes
        self.largest_side = largest_side

    def __str__(self) -> str:
        fits = (
            f"the largest that fits with the rest as asked is "
            f"{self.largest_side}x{self.largest_side}"
            if self.largest_side
            else "no size fits with the rest as asked; ask for fewer images or no guidance"
        )
        return (
            f"{self.num_images} image(s) of {self.width}x{self.height} would need about "
            f"{self.needed_bytes / 2**30:.1f} GiB of device memory; this model's replicas have "
            f"{self.budget_bytes / 2**30:.1f} GiB: {fits}"
        )


class Busy(Exception):
    """The service takes no more of these requests now (HTTP 429 with Retry-After).

    Args:
        reason: "queue" (the model's replicas have as many as they take) or "key_limit"
            (this API key has as many in flight as it may).
        limit: the limit reached.
        retry_after_s: when a retry is likely to be taken.
    """

    def __init__(self, reason: str, limit: int, retry_after_s: int):
        super().__init__(reason, limit, retry_after_s)
        self.reason, self.limit, self.retry_after_s = reason, limit, retry_after_s
        self.code = "queue_full" if reason == "queue" else "key_limit"

    def __str__(self) -> str:
        if self.reason == "queue":
            return (
                f"the service is at capacity for this model ({self.limit} requests in "
                f"flight); retry after {self.retry_after_s} s"
            )
        return (
            f"this API key has {self.limit} requests in flight, as many as it may; wait "
            "for one to finish"
        )


class DeadlineExceeded(Exception):
    """A request still running at the service's deadline; it was cancelled (HTTP 504).

    Args:
        timeout_s: the deadline (the application's request_timeout_s).
        stage: where it was.
    """

    code = "timeout"

    def __init__(self, timeout_s: float, stage: str):
        super().__init__(timeout_s, stage)
        self.timeout_s, self.stage = timeout_s, stage

    def __str__(self) -> str:
        return (
            f"the request ran past the service's {self.timeout_s:g} s limit (in {self.stage}) "
            "and was cancelled; ask for fewer steps, a smaller size or fewer images"
        )


class ReplicaFailed(Exception):
    """A model replica died while it served the request (HTTP 503 with Retry-After);
    Ray starts another.

    Args:
        deployment: which deployment's replica.
    """

    code = "replica_failed"
    retry_after_s = 5

    def __init__(self, deployment: str):
        super().__init__(deployment)
        self.deployment = deployment

    def __str__(self) -> str:
        return (
            f"a {self.deployment} replica failed while it served this request; another is "
            f"starting: retry after {self.retry_after_s} s"
        )

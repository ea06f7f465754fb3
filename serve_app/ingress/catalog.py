"""What the ingress knows of each served model, asked of the model's own replicas: family,
presets, limits, adapters. Each model is asked apart, so one model's replicas being down
or busy never holds up another model's requests.

A model scaled to zero (no Denoiser replica alive or starting: deploy/
serve_config.scale_to_zero.yaml) is never asked by a probe or a listing, since asking
would start a replica: its facts in hand serve, and only a generation request wakes it
(and waits for it, up to the request's deadline)."""

import asyncio
import time
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.ingress.detached import detached
from serve_app.ingress.errors import NotReady
from serve_app.schema import MAX_IMAGES, MAX_STEPS, InvalidRequest, Limits

DESCRIBE_TIMEOUT_S = 10.0
# How long the ingress waits for InFlight's list of idle models; past it, none are.
IDLE_TIMEOUT_S = 2.0
# How often the adapter listing may be asked again when a request names one not in it
# (a file an operator just added), so that unknown names cannot flood the replicas.
LORA_REFRESH_S = 2.0
# How old a model's facts may get before a request asks for them again, in the
# background (presets follow their adapters' files, listings their folders).
FACTS_REFRESH_S = 30.0


@dataclass
class Model:
    """One served model as its replicas described it."""

    id: str
    family: str
    presets: dict[str, dict]
    default_preset: str
    limits: Limits
    max_prompt_tokens: int
    scheduler: str
    loras: list[dict]  # [{"name", "bytes"}]
    lora_slots: int
    memory: dict  # the Denoiser's budget and what it holds (serve_app/vram.py)
    asked_at: float

    def listing(self) -> dict:
        """Its entry in GET /v1/models (OpenAI's shape plus ours)."""
        return {
            "id": self.id,
            "object": "model",
            "created": 0,
            "owned_by": "t2i-serve",
            "family": self.family,
            "scheduler": self.scheduler,
            "presets": self.presets,
            "default_preset": self.default_preset,
            "loras": self.loras,
            "limits": {
                "min_side": self.limits.min_side,
                "max_side": self.limits.max_side,
                "side_multiple": self.limits.side_multiple,
                "max_prompt_tokens": self.max_prompt_tokens,
                "max_images": MAX_IMAGES,
                "max_steps": MAX_STEPS,
                "max_loras": self.lora_slots,
            },
        }


class Catalog:
    """Args:
    config: the application's settings.
    encoders, denoisers: model id -> handle of its PromptEncoder / Denoiser deployment.
    inflight: the InFlight deployment (which models are idle).
    on_first_sight: called with a Model the first time it is described.
    """

    def __init__(
        self,
        config: AppConfig,
        encoders: dict[str, DeploymentHandle],
        denoisers: dict[str, DeploymentHandle],
        inflight: DeploymentHandle,
        on_first_sight=lambda model: None,
    ):
        self.config, self.encoders, self.denoisers = config, encoders, denoisers
        self.inflight = inflight
        self.ids = [m.id for m in config.models]
        self._models: dict[str, Model] = {}
        self._refreshing: dict[str, asyncio.Future] = {}
        self._on_first_sight = on_first_sight

    def known(self, model_id: str | None) -> str:
        """The id a request's `model` field picks (the first model if it names none)."""
        if model_id is None:
            return self.ids[0]
        if model_id not in self.encoders:
            raise InvalidRequest(
                f"model '{model_id}' is not served here; available: {', '.join(self.ids)}",
                "model",
                "model_not_found",
            )
        return model_id

    def cached(self, model_id: str) -> Model | None:
        return self._models.get(model_id)

    async def idle(self) -> set[str]:
        """Models with no Denoiser replica alive or starting (InFlight.idle); none if
        InFlight does not answer at once."""
        try:
            return set(await asyncio.wait_for(self.inflight.idle.remote(), IDLE_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - then every model is asked as usual
            return set()

    async def readiness(self) -> dict[str, dict]:
        """Each model's readiness: "ready" with its replicas' describe(), "idle" (scaled
        to zero: not asked) or "not_ready" with the reason."""
        idle = await self.idle()
        asking = [i for i in self.ids if i not in idle]
        asked = await asyncio.gather(*map(self.describe, asking), return_exceptions=True)
        models = {
            i: {"status": "idle", "reason": "no Denoiser replica runs; a request starts one"}
            for i in idle
        }
        for model_id, answer in zip(asking, asked, strict=True):
            if isinstance(answer, BaseException):
                models[model_id] = {"status": "not_ready", "reason": str(answer)}
            else:
                models[model_id] = {"status": "ready", "encoder": answer[0], "denoiser": answer[1]}
        return {i: models[i] for i in self.ids}

    async def describe(
        self, model_id: str, wait_s: float = DESCRIBE_TIMEOUT_S
    ) -> tuple[dict, dict]:
        """describe() of one encoder and one denoiser replica of a model; NotReady if
        either fails or takes over `wait_s`. They answer only after load and warm-up."""
        try:
            return await asyncio.wait_for(
                asyncio.gather(
                    self.encoders[model_id].describe.remote(),
                    self.denoisers[model_id].describe.remote(),
                ),
                wait_s,
            )
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            raise NotReady(f"the replicas of model '{model_id}' are not ready ({exc!r})") from exc

    async def model(self, model_id: str, wake: bool = True) -> Model:
        """The model's facts: asked once, then again in the background when older than
        FACTS_REFRESH_S (the answer in hand serves meanwhile) unless the model is idle.
        An idle model never seen is woken and waited for (up to request_timeout_s) if
        `wake`; else it is woken in the background and NotReady is raised at once."""
        model = self._models.get(model_id)
        if model is not None:
            fresh = time.monotonic() - model.asked_at <= FACTS_REFRESH_S
            if fresh or model_id in self._refreshing:
                return model
        idle = model_id in await self.idle()  # asked only when there is a call to make
        if model is None and idle:
            if wake:
                return await self._ask(model_id, self.config.request_timeout_s)
            self._refresh(model_id, self.config.request_timeout_s)
            raise NotReady(f"model '{model_id}' is scaled to zero; a replica is starting")
        if model is None:
            return await self._ask(model_id)
        if not idle:
            self._refresh(model_id)
        return model

    def _refresh(self, model_id: str, wait_s: float = DESCRIBE_TIMEOUT_S) -> None:
        """Ask the model's facts in the background (once at a time), outside the
        request that asked: its client leaving must not cancel the refresh."""
        if model_id not in self._refreshing:
            task = detached(self._ask(model_id, wait_s))
            self._refreshing[model_id] = task
            task.add_done_callback(lambda t, m=model_id: self._refreshed(m, t))

    def _refreshed(self, model_id: str, task: asyncio.Future) -> None:
        self._refreshing.pop(model_id, None)
        if not task.cancelled():
            task.exception()  # a failed refresh keeps the facts in hand; next time again

    async def with_loras(self, model_id: str, names: list[str]) -> Model:
        """The model's facts, asked again (at most every LORA_REFRESH_S) if they do not
        list every adapter in `names`: a file may have been added since. If the replicas
        do not answer, the facts in hand judge the names."""
        model = await self.model(model_id)
        listed = {lora["name"] for lora in model.loras}
        if set(names) <= listed or time.monotonic() - model.asked_at < LORA_REFRESH_S:
            return model
        try:
            return await self._ask(model_id)
        except NotReady:
            return model

    async def _ask(self, model_id: str, wait_s: float = DESCRIBE_TIMEOUT_S) -> Model:
        enc, den = await self.describe(model_id, wait_s)
        first = model_id not in self._models
        model = Model(
            id=model_id,
            family=den["family"],
            presets=den["presets"],
            default_preset=den["default_preset"],
            limits=Limits(self.config.min_side, self.config.max_side, den["side_multiple"]),
            max_prompt_tokens=enc["max_prompt_tokens"],
            scheduler=den["scheduler"],
            loras=den["loras"]["available"],
            lora_slots=den["loras"]["slots"] if den["loras"]["dir"] else 0,
            memory=den["memory"],
            asked_at=time.monotonic(),
        )
        self._models[model_id] = model
        if first:
            self._on_first_sight(model)
        return model

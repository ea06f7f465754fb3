"""A Denoiser replica's adapters: which are resident, loading a missing one off the event
loop (once, however many requests wait for it), pins for the requests that use them,
hit/miss/error counts, and telling Ray Serve which adapters this replica holds so that
requests are routed to a replica that already has theirs (model multiplexing)."""

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

from ray import serve

from serve_app.config import LoraSettings
from serve_app.errors import LoraError
from serve_app.messages import LoraChoice
from serve_app.metrics import Metrics

logger = logging.getLogger("ray.serve")


class Adapters:
    """Args:
    engine: the replica's denoiser (reads adapter files for its model).
    folder: the model's LoRA folder, or None when it serves no adapters.
    settings: the model's LoRA settings.
    metrics: the replica's metrics; labels: its (family, model).
    """

    def __init__(
        self, engine, folder: Path | None, settings: LoraSettings, metrics: Metrics, labels
    ):
        from serve_app.engine.lora import AdapterCache

        self.engine, self.folder, self.settings = engine, folder, settings
        self.metrics, self.labels = metrics, labels
        self.cache = AdapterCache(settings.cache_size, settings.cache_bytes)
        self._loading: dict[str, asyncio.Future] = {}
        # Files refused, by name: the same file is refused again without being read.
        self._refused: dict[str, tuple[tuple, LoraError]] = {}
        # This replica's own record, for operators and tests: loads and hits by name.
        self.loads: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        # Serve's multiplexing: the replica reports the ids its wrapper has seen (an LRU
        # of `cache_size`), and the router sends a request carrying one of them here.
        self.route = serve.multiplexed(max_num_models_per_replica=settings.cache_size)(
            self._registered
        )
        if folder is not None:
            metrics.start_at_zero(*labels, metrics.lora_loads)

    @staticmethod
    async def _registered(name: str) -> str:
        return name

    def available(self) -> dict[str, Path]:
        from serve_app.engine.lora import available

        return available(self.folder)

    async def acquire(self, choices: tuple[LoraChoice, ...]) -> list:
        """The resident adapter of each choice, loaded if missing and pinned until
        `release`; raises LoraError (unknown name, unusable file) with none left pinned."""
        if not choices:
            return []
        if self.folder is None:
            from serve_app.errors import UnknownLora

            raise UnknownLora(choices[0].name, [])
        await self.route(choices[0].name)
        acquired = []
        try:
            for choice in choices:
                adapter = await self._get(choice.name)
                self.cache.pin(adapter)
                acquired.append(adapter)
        except BaseException:
            self.release(acquired)
            raise
        return acquired

    def release(self, adapters: list) -> None:
        for adapter in adapters:
            self.cache.unpin(adapter)

    async def _get(self, name: str):
        from serve_app.engine.lora import locate

        try:
            path = locate(self.folder, name)
            stamp = _stamp(path, name, self.available)
        except LoraError:
            self.metrics.lora(*self.labels, "error")
            raise
        refused = self._refused.get(name)
        if refused is not None and refused[0] == stamp:
            self.metrics.lora(*self.labels, "error")
            raise type(refused[1])(*refused[1].args)  # a fresh one: no traceback to grow
        adapter = self.cache.get(name)
        if adapter is not None and adapter.stamp == stamp:
            self.hits[name] += 1
            self.metrics.lora(*self.labels, "hit")
            return adapter
        if name in self._loading:  # another request is loading it: no second load
            self.hits[name] += 1
            self.metrics.lora(*self.labels, "hit")
            return await asyncio.shield(self._loading[name])
        loading = asyncio.ensure_future(self._load(name, path, stamp))
        self._loading[name] = loading
        try:
            return await asyncio.shield(loading)
        finally:
            if loading.done():
                self._loading.pop(name, None)
            else:
                loading.add_done_callback(lambda _: self._loading.pop(name, None))

    async def _load(self, name: str, path: Path, stamp: tuple):
        started = time.perf_counter()
        try:
            adapter = await asyncio.to_thread(self.engine.read_adapter, path)
        except LoraError as exc:
            self.metrics.lora(*self.labels, "error")
            self._refused[name] = (stamp, exc)
            logger.warning("adapter %s refused: %s", name, exc)
            raise
        adapter.stamp = stamp
        seconds = time.perf_counter() - started
        self.loads[name] += 1
        self.metrics.lora(*self.labels, "miss", seconds)
        evicted = self.cache.put(adapter)
        logger.info(
            "adapter %s loaded in %.3f s (%.1f MB, rank %d)%s%s",
            name,
            seconds,
            adapter.nbytes / 1e6,
            adapter.rank,
            f"; evicted {', '.join(evicted)}" if evicted else "",
            f"; not applied: {', '.join(adapter.ignored)}" if adapter.ignored else "",
        )
        return adapter

    def describe(self) -> dict:
        """For the replica's describe(); call it on the event loop, which alone changes
        the cache."""
        listed = []
        for name, path in self.available().items():
            try:
                listed.append({"name": name, "bytes": path.stat().st_size})
            except FileNotFoundError:  # removed since it was listed
                continue
        return {
            "dir": str(self.folder) if self.folder is not None else None,
            "available": listed,
            "resident": self.cache.names,
            "resident_bytes": self.cache.nbytes,
            "loads": dict(self.loads),
            "hits": dict(self.hits),
            "mode": self.settings.mode,
            "host_copy_bytes": self.engine.lora.host_bytes if self.engine.lora is not None else 0,
            "slots": self.settings.slots,
            "max_rank": self.settings.max_rank,
        }


def _stamp(path: Path, name: str, available) -> tuple[int, int]:
    """What tells a replaced file from the one loaded: modification time and size.
    A file removed since it was found is unknown (`available` lists what is left)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        from serve_app.errors import UnknownLora

        raise UnknownLora(name, sorted(available())) from None
    return st.st_mtime_ns, st.st_size

"""The service's Prometheus metrics (names and labels fixed in DESIGN.md).

Recorded through `ray.serve.metrics`, so they leave through Ray's metrics export port with
Ray Serve's own `deployment`, `replica` and `application` labels added. Ray prefixes
application metrics with `ray_` on export: `t2i_requests_total` is scraped as
`ray_t2i_requests_total`. Labels stay low-cardinality: no prompt, no request id, and
resolution in buckets.

Ray exports a histogram's `_sum` from bucket midpoints, not the observed values: use the
buckets (histogram_quantile) for latency and VRAM, not sum/count averages. The exact
peak of the last request per stage is also kept in `t2i_stage_vram_peak_last_bytes`
(an addition to DESIGN.md's list).

Every per-request series carries `family` and `model` (the served model's id: a few
per application). Create one `Metrics` per replica, in the replica's constructor (not
at import: the metric objects belong to the process that records them).
"""

from ray.serve import metrics

STAGE_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60]
STEP_SECONDS = [0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1]
# 100 MB to 200 GB: fine steps where today's cards and models sit (1 GB up to 48 GB).
VRAM_BYTES = (
    [1e8, 2.5e8, 5e8, 7.5e8]
    + [gb * 1e9 for gb in range(1, 49)]
    + [56e9, 64e9, 72e9, 80e9, 96e9, 112e9, 128e9, 141e9, 160e9, 200e9]
)
CANCEL_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10]
LORA_LOAD_SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]

OUTCOMES = ("ok", "cancelled", "rejected", "invalid", "oom", "error")
LORA_RESULTS = ("hit", "miss", "error")
REJECT_REASONS = ("vram", "queue", "key_limit")
M = ("family", "model")
RES_BUCKETS = (512, 768, 1024, 1280, 1536, 2048)


def res_bucket(width: int, height: int) -> str:
    """The side of the smallest square bucket holding width*height pixels, e.g. "1024"."""
    pixels = width * height
    return str(next((side for side in RES_BUCKETS if pixels <= side * side), RES_BUCKETS[-1]))


class Metrics:
    """All t2i_* metrics of one replica; each replica records the ones its stages own."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "t2i_requests_total", "Requests by outcome.", tag_keys=(*M, "outcome")
        )
        self.stage_latency = metrics.Histogram(
            "t2i_stage_latency_seconds",
            "Wall time of each stage of a request.",
            boundaries=STAGE_SECONDS,
            tag_keys=(*M, "stage"),
        )
        self.step_latency = metrics.Histogram(
            "t2i_step_latency_seconds",
            "Time of one denoising step, by resolution bucket.",
            boundaries=STEP_SECONDS,
            tag_keys=(*M, "res"),
        )
        self.stage_vram_peak = metrics.Histogram(
            "t2i_stage_vram_peak_bytes",
            "Peak device memory allocated during a stage.",
            boundaries=VRAM_BYTES,
            tag_keys=(*M, "stage"),
        )
        self.stage_vram_peak_last = metrics.Gauge(
            "t2i_stage_vram_peak_last_bytes",
            "Peak device memory of the last request's stage on this replica (exact).",
            tag_keys=(*M, "stage"),
        )
        self.vram = metrics.Gauge(
            "t2i_vram_bytes", "Device memory of this replica by kind.", tag_keys=("kind",)
        )
        self.queue_depth = metrics.Gauge(
            "t2i_queue_depth", "Requests waiting inside this replica for its device."
        )
        self.cancelled_steps = metrics.Counter(
            "t2i_cancelled_steps_total", "Denoising steps not run because of a cancel.", M
        )
        self.cancel_latency = metrics.Histogram(
            "t2i_cancel_latency_seconds",
            "From the cancel signal to the step loop stopping.",
            boundaries=CANCEL_SECONDS,
            tag_keys=M,
        )
        self.oom = metrics.Counter("t2i_oom_total", "Requests that ran out of device memory.", M)
        self.admission_rejects = metrics.Counter(
            "t2i_admission_rejects_total",
            "Requests turned away before any work: predicted not to fit the device (vram), "
            "the model at capacity (queue), the API key at its limit (key_limit).",
            tag_keys=(*M, "reason"),
        )
        self.lora_loads = metrics.Counter(
            "t2i_lora_loads_total",
            "Adapters a request asked for: hit (resident), miss (loaded), error (refused).",
            tag_keys=(*M, "result"),
        )
        self.lora_load_seconds = metrics.Histogram(
            "t2i_lora_load_seconds",
            "Time to read an adapter file and put it on the device (misses only).",
            boundaries=LORA_LOAD_SECONDS,
            tag_keys=M,
        )
        # Ray stops exporting a gauge that is not set again within two export intervals;
        # `refresh` re-sets these on a timer so they do not vanish between requests.
        self._last_peaks: dict[tuple[str, str, str], int] = {}

    def start_at_zero(self, family: str, model: str, *counters: metrics.Counter) -> None:
        """Export `counters` (the ones this replica owns) at 0 before their first event,
        as Prometheus advises, so that rates and alerts see a series from the start.
        (Ray's Counter.inc refuses 0; `_record` is what it calls.)"""
        tags = {"family": family, "model": model}
        for counter in counters:
            if counter is self.requests:
                for outcome in OUTCOMES:
                    counter._record(0, tags={**tags, "outcome": outcome})
            elif counter is self.lora_loads:
                for result in LORA_RESULTS:
                    counter._record(0, tags={**tags, "result": result})
            elif counter is self.admission_rejects:
                for reason in REJECT_REASONS:
                    counter._record(0, tags={**tags, "reason": reason})
            else:
                counter._record(0, tags=tags)

    def request(self, family: str, model: str, outcome: str) -> None:
        self.requests.inc(1, tags={"family": family, "model": model, "outcome": outcome})

    def rejected(self, family: str, model: str, reason: str) -> None:
        """A request turned away before any work, for `reason` (REJECT_REASONS)."""
        self.admission_rejects.inc(1, tags={"family": family, "model": model, "reason": reason})

    def out_of_memory(self, family: str, model: str) -> None:
        self.oom.inc(1, tags={"family": family, "model": model})

    def stage(
        self,
        family: str,
        model: str,
        stage: str,
        seconds: float,
        vram_peak_bytes: int | None = None,
    ) -> None:
        tags = {"family": family, "model": model, "stage": stage}
        self.stage_latency.observe(seconds, tags=tags)
        if vram_peak_bytes is not None:
            self.stage_vram_peak.observe(vram_peak_bytes, tags=tags)
            self.stage_vram_peak_last.set(vram_peak_bytes, tags=tags)
            self._last_peaks[family, model, stage] = vram_peak_bytes

    def lora(self, family: str, model: str, result: str, load_seconds: float | None = None) -> None:
        tags = {"family": family, "model": model}
        self.lora_loads.inc(1, tags={**tags, "result": result})
        if load_seconds is not None:
            self.lora_load_seconds.observe(load_seconds, tags=tags)

    def refresh(self, queue_depth: int, vram: dict[str, int]) -> None:
        """Set this replica's gauges again: queue depth, VRAM by kind, last peaks."""
        self.queue_depth.set(queue_depth)
        for kind, value in vram.items():
            self.vram.set(value, tags={"kind": kind})
        # A copy (one step under the GIL): `stage` adds keys from other threads.
        for (family, model, stage), value in list(self._last_peaks.items()):
            tags = {"family": family, "model": model, "stage": stage}
            self.stage_vram_peak_last.set(value, tags=tags)

    def steps(self, family: str, model: str, seconds: list[float], width: int, height: int) -> None:
        tags = {"family": family, "model": model, "res": res_bucket(width, height)}
        for s in seconds:
            self.step_latency.observe(s, tags=tags)

    def cancelled(
        self, family: str, model: str, steps_not_run: int, latency_s: float | None
    ) -> None:
        tags = {"family": family, "model": model}
        if steps_not_run:
            self.cancelled_steps.inc(steps_not_run, tags=tags)
        if latency_s is not None:
            self.cancel_latency.observe(latency_s, tags=tags)

"""What float8 costs torch.compile on a GPU: two feed-forward blocks at Z-Image's width
(3840 -> 3840 -> 10240 -> 3840) with torchao's float8 rowwise layers, compiled as our
blocks are (dynamic shapes, no duck sizing, inductor's deterministic mode), timed to the
first output of each new input shape, with inductor's counters and compile times.

  python -m load_tests.probe_fp8_compile default   # torchao's quantize_ as it comes
  python -m load_tests.probe_fp8_compile keep      # set_inductor_config=False (ours)
  python -m load_tests.probe_fp8_compile aten      # as default, float8 products on ATen only

The shapes: (1, 4096) and (1, 4160) tokens (one graph, dynamic), then a batch of 2 (a
second graph, as guidance compiles). *-2026-12-06-perf-12-to-14.md* has what it showed
(its output: *-2026-12-06-f8-inductor.log*, where `keep` ran as `noset`).
"""

import sys
import time

import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(3840, 3840, bias=False)
        self.w1 = torch.nn.Linear(3840, 10240, bias=False)
        self.w2 = torch.nn.Linear(10240, 3840, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(self.q(x))))


def main(mode: str) -> None:
    from torch._dynamo.utils import compile_times, counters
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    torch.fx.experimental._config.use_duck_shape = False
    torch._inductor.config.deterministic = True
    model = torch.nn.Sequential(Block(), Block()).to(torch.bfloat16).cuda()
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), set_inductor_config=mode != "keep"
    )
    quantize_(model, config)
    options = {"max_autotune_gemm_backends": "ATEN"} if mode == "aten" else None
    for block in model:
        block.compile(fullgraph=True, dynamic=True, options=options)
    with torch.no_grad():
        for batch, tokens in ((1, 4096), (1, 4160), (2, 4096)):
            x = torch.randn(batch, tokens, 3840, dtype=torch.bfloat16, device="cuda")
            start = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            print(mode, batch, tokens, "first call s", round(time.perf_counter() - start, 1))
        start = time.perf_counter()
        for _ in range(20):
            model(x)
        torch.cuda.synchronize()
        print(mode, "ms/call", round((time.perf_counter() - start) / 20 * 1e3, 3))
    print(dict(counters["inductor"]))
    keys = ("compile_inner", "call_user_compiler", "compile_to_module", "async_compile",
            "benchmark")  # fmt: skip
    times = compile_times(repr="str", aggregate=True).splitlines()
    print("\n".join(line for line in times if any(key in line for key in keys)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "default")

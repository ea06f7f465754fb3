"""Train the demo model: a tiny Z-Image-architecture pipeline that draws the captioned
shapes of training/shapes.py, and its "outline" style adapter.

    python -m training.train_demo --out serve_app/data/demo      (make train-demo)

Three phases, each stopping at its step count or its share of --budget-s, whichever
comes first:
1. the VAE (Z-Image's 16-channel AutoencoderKL layout) as an autoencoder of the scenes;
   its latents' mean and spread become its shift_factor and scaling_factor;
2. the transformer (ZImageTransformer2DModel) and the text encoder (Qwen3) together,
   with Z-Image's flow-matching objective, on latents of the frozen VAE; one caption in
   ten is dropped (encoded as "", the negative prompt the service sends) so that
   classifier-free guidance has an unconditional model to push away from;
3. a LoRA on the frozen transformer, trained on the same captions drawn as outlines at
   the adapter scale the presets use (0.85).

The pipeline is saved with diffusers' save_pretrained and the adapter with
ZImageLoraLoaderMixin.save_lora_weights: the service loads them as it loads a download.
training.json beside them records the device, steps, seconds and losses of each phase.
"""

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from serve_app.engine.checkpoint import PRESETS_FILE
from training.forward import forward, padded_length
from training.shapes import draw_scenes, render, vocabulary

ADAPTER = "outline"
ADAPTER_SCALE = 0.85
CAPTION_DROPOUT = 0.1
SIZE = 256
# The folder's presets.json (see serve_app/engine/checkpoint.py). Guidance 5 at 8 steps:
# the shipped weights (one plain H200 run of this script) draw all 15 held-aside scenes
# right there on a CPU (README, "The demo model"); earlier fresh GPU runs drew 100% and
# 73% (load_tests/results/*-2026-12-03-demo-eval-*.json).
PRESETS = {
    "presets": {
        "demo": {"width": SIZE, "height": SIZE, "num_inference_steps": 8, "guidance_scale": 5.0},
        ADAPTER: {
            "width": SIZE,
            "height": SIZE,
            "num_inference_steps": 8,
            "guidance_scale": 5.0,
            "loras": [{"name": ADAPTER, "scale": ADAPTER_SCALE}],
        },
    },
    "default_preset": "demo",
}


@dataclass
class Phase:
    steps: int
    batch: int
    lr: float
    share: float  # of the time budget


@dataclass
class Plan:
    vae: Phase
    dit: Phase
    lora: Phase
    budget_s: float


PLANS = {
    # One H100/H200: about 8 minutes, each phase bound by its time share.
    "gpu": Plan(
        vae=Phase(steps=4000, batch=32, lr=1e-3, share=0.12),
        dit=Phase(steps=100000, batch=96, lr=5e-4, share=0.6),
        lora=Phase(steps=100000, batch=64, lr=1e-3, share=0.28),
        budget_s=460,
    ),
    # Continuing a trained model (--resume) on a CPU: its transformer and text encoder,
    # then its adapter, from their files.
    "cpu-resume": Plan(
        vae=Phase(steps=0, batch=0, lr=0, share=0),
        dit=Phase(steps=100000, batch=8, lr=2e-4, share=0.55),
        lora=Phase(steps=100000, batch=8, lr=2e-3, share=0.45),
        budget_s=3300,
    ),
    # A quick run that exercises every phase (tests, a CPU): weights that draw little.
    "smoke": Plan(
        vae=Phase(steps=3, batch=2, lr=1e-3, share=0.2),
        dit=Phase(steps=3, batch=2, lr=5e-4, share=0.6),
        lora=Phase(steps=2, batch=2, lr=1e-3, share=0.2),
        budget_s=120,
    ),
}


def build(seed: int = 0):
    """The untrained demo pipeline: Z-Image's components at small sizes."""
    from diffusers import AutoencoderKL
    from diffusers.models.transformers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from serve_app.engine.zimage.tiny import assemble, build_tokenizer, vae_config

    captions = [s.caption for s in draw_scenes(seed, 2000)] + vocabulary()
    tokenizer = build_tokenizer(captions, vocab_size=400)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            # Z-Image reads hidden_states[-2]: the last layer is carried, never used.
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = ZImageTransformer2DModel(
        dim=192,
        n_layers=4,
        n_refiner_layers=1,
        n_heads=3,
        n_kv_heads=3,
        cap_feat_dim=64,
        axes_dims=[16, 24, 24],
        axes_lens=[1536, 512, 512],
    )
    vae = AutoencoderKL(**vae_config([32, 64, 64, 64], layers_per_block=1, norm_num_groups=16))
    return assemble(tokenizer, text_encoder, transformer, vae)


class Trainer:
    """The phases over one pipeline on one device (see the module's docstring)."""

    def __init__(self, pipe, device: torch.device, plan: Plan, seed: int, log=print):
        self.pipe, self.device, self.plan, self.log = pipe, device, plan, log
        self.seed = seed
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
        self.report: dict = {"device": _device_name(device), "plan": asdict(plan), "phases": {}}
        self._scene_seed = seed * 1_000_003
        self._token_ids: dict[str, list[int]] = {}

    def scenes(self, n: int):
        self._scene_seed += 1
        return draw_scenes(self._scene_seed, n)

    def _loop(self, name: str, phase: Phase, params, step_fn) -> None:
        """Run `step_fn(batch) -> loss` with AdamW on `params` until the phase's steps or
        time share end; linear warm-up, then a linear decay to 5% over the time share."""
        optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.0)
        seconds = phase.share * self.plan.budget_s
        start, losses, step = time.monotonic(), [], 0
        while step < phase.steps and (elapsed := time.monotonic() - start) < seconds:
            progress = max(elapsed / seconds, step / phase.steps)
            lr = phase.lr * min(1.0, (step + 1) / 100) * max(0.05, 1 - progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with self.autocast:
                loss = step_fn(phase.batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 200 == 0:
                mean = sum(losses[-200:]) / 200
                self.log(f"{name} step {step} loss {mean:.4f} at {elapsed:.0f} s")
        tail = losses[-100:]
        self.report["phases"][name] = {
            "steps": step,
            "seconds": round(time.monotonic() - start, 1),
            "loss_first": round(losses[0], 4),
            "loss_last100": round(sum(tail) / len(tail), 4),
        }
        self.log(f"{name}: {self.report['phases'][name]}")

    # 1. The VAE
    def train_vae(self) -> None:
        vae = self.pipe.vae.to(self.device).train()

        def step(batch: int) -> torch.Tensor:
            x = render(self.scenes(batch), SIZE, device=self.device)
            posterior = vae.encode(x).latent_dist
            decoded = vae.decode(posterior.sample()).sample.float()
            kl = posterior.kl().mean() / x[0].numel()
            return F.l1_loss(decoded, x) + F.mse_loss(decoded, x) + 1e-4 * kl

        self._loop("vae", self.plan.vae, list(vae.parameters()), step)
        vae.eval().requires_grad_(False)
        with torch.no_grad(), self.autocast:
            batch = self.plan.vae.batch
            z = torch.cat(
                [
                    vae.encode(render(self.scenes(batch), SIZE, device=self.device))
                    .latent_dist.mode()
                    .float()
                    for _ in range(8)
                ]
            )
        shift, scale = z.mean().item(), 1 / z.std().item()
        vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
        self.report["vae_latents"] = {"shift_factor": shift, "scaling_factor": scale}

    def latents(self, scenes, outline: bool = False) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.no_grad():
            x = render(scenes, SIZE, outline=outline, device=self.device)
            z = vae.encode(x).latent_dist.mode().float()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_states[-2] of the captions, right-padded, (B, L, D); their lengths),
        as the service's encoder has them."""
        from serve_app.engine.zimage.encoder import chat_token_ids

        ids = []
        for caption in captions:
            if caption not in self._token_ids:
                self._token_ids[caption] = chat_token_ids(self.pipe.tokenizer, caption)
            ids.append(self._token_ids[caption])
        longest = max(map(len, ids))
        pad = self.pipe.tokenizer.pad_token_id
        input_ids = torch.tensor([i + [pad] * (longest - len(i)) for i in ids])
        lengths = torch.tensor([len(i) for i in ids])
        mask = torch.arange(longest)[None, :] < lengths[:, None]
        hidden = self.pipe.text_encoder(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.long().to(self.device),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states[-2]
        return hidden, lengths

    def flow_loss(self, scenes, outline: bool = False, lora_scale: float | None = None):
        """Z-Image's objective: at sigma (the scheduler's shifted distribution), the
        transformer, given 1 - sigma, predicts x0 - noise (the negated velocity).
        Captions of one padded length go through the transformer together
        (training/forward.py)."""
        x0 = self.latents(scenes, outline)
        noise = torch.randn_like(x0)
        u = torch.rand(len(scenes), device=self.device)
        shift = self.pipe.scheduler.config.shift
        sigma = shift * u / (1 + (shift - 1) * u)
        s = sigma[:, None, None, None]
        noisy = (1 - s) * x0 + s * noise
        kept = (torch.rand(len(scenes)) >= CAPTION_DROPOUT).tolist()
        captions = [scene.caption if keep else "" for keep, scene in zip(kept, scenes, strict=True)]
        hidden, lengths = self.encode(captions)
        padded = torch.tensor([padded_length(n) for n in lengths.tolist()])
        loss = 0.0
        for length in padded.unique().tolist():
            rows = (padded == length).nonzero().flatten().to(self.device)
            cap = F.pad(hidden[rows, :length], (0, 0, 0, max(0, length - hidden.shape[1])))
            predicted = forward(
                self.pipe.transformer,
                noisy[rows],
                1 - sigma[rows],
                cap,
                lengths[rows.cpu()],
                lora_scale,
            ).float()
            target = (x0 - noise)[rows]
            loss = loss + F.mse_loss(predicted, target, reduction="sum") / x0.numel()
        return loss

    # 2. The transformer and the text encoder
    def train_dit(self) -> None:
        transformer = self.pipe.transformer.to(self.device).train()
        text_encoder = self.pipe.text_encoder.to(self.device).train()
        params = list(transformer.parameters()) + list(text_encoder.parameters())
        self._loop("dit", self.plan.dit, params, lambda b: self.flow_loss(self.scenes(b)))
        transformer.eval().requires_grad_(False)
        text_encoder.eval().requires_grad_(False)

    # 3. The style adapter
    def train_lora(self, rank: int = 8, start: Path | None = None) -> tuple[dict, dict]:
        """(state dict in PEFT's keys, LoraConfig as a dict) of the outline adapter,
        trained from zero or from the adapter file `start`."""
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        from serve_app.engine.zimage.denoiser import LORA

        transformer = self.pipe.transformer
        names = sorted(
            name
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA.targets, name)
        )
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names)
        transformer.add_adapter(config, adapter_name=ADAPTER)
        if start is not None:
            from diffusers.loaders import ZImageLoraLoaderMixin
            from peft.utils import set_peft_model_state_dict

            state = ZImageLoraLoaderMixin.lora_state_dict(str(start))
            prefix = "transformer."
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            missing = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
            if missing.unexpected_keys:
                raise ValueError(f"{start}: unexpected keys {missing.unexpected_keys[:3]}")
        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        self._loop(
            "lora",
            self.plan.lora,
            params,
            lambda b: self.flow_loss(self.scenes(b), outline=True, lora_scale=ADAPTER_SCALE),
        )
        state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        config = config.to_dict()
        config["target_modules"] = sorted(config["target_modules"])  # JSON has no sets
        transformer.delete_adapters(ADAPTER)
        return state, config


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or 'x86_64'})"


def train(out: Path, plan: Plan, device: torch.device, seed: int = 0, log=print) -> dict:
    """Train and save the demo pipeline into `out` (and its adapter into out/loras)."""
    from diffusers.loaders import ZImageLoraLoaderMixin

    torch.manual_seed(seed)
    started = time.monotonic()
    pipe = build(seed)
    trainer = Trainer(pipe, device, plan, seed, log)
    trainer.train_vae()
    trainer.train_dit()
    pipe.to("cpu", torch.float32)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / PRESETS_FILE).write_text(json.dumps(PRESETS, indent=2) + "\n")
    log(f"saved the pipeline to {out}")
    pipe.transformer.to(device)
    pipe.text_encoder.to(device)
    pipe.vae.to(device)
    state, config = trainer.train_lora()
    ZImageLoraLoaderMixin.save_lora_weights(
        out / "loras",
        transformer_lora_layers=state,
        weight_name=f"{ADAPTER}.safetensors",
        transformer_lora_adapter_metadata=config,
    )
    report = trainer.report
    report["seed"] = seed
    report["seconds"] = round(time.monotonic() - started, 1)
    report["torch"] = torch.__version__
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done in {report['seconds']} s: {out}")
    return report


def resume(folder: Path, plan: Plan, device: torch.device, seed: int = 0, log=print):
    """Train the model in `folder` further: its transformer and text encoder, then its
    adapter from its own file; each saved in its place, the run added to
    training.json's "continued"."""
    from diffusers import ZImagePipeline
    from diffusers.loaders import ZImageLoraLoaderMixin

    torch.manual_seed(seed)
    pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    pipe.vae.requires_grad_(False)
    trainer = Trainer(pipe, device, plan, seed, log)
    trainer.train_dit()
    for name in ("transformer", "text_encoder"):
        getattr(pipe, name).save_pretrained(folder / name, safe_serialization=True)
    log(f"saved the transformer and the text encoder to {folder}")
    path = folder / "loras" / f"{ADAPTER}.safetensors"
    state, config = trainer.train_lora(start=path)
    ZImageLoraLoaderMixin.save_lora_weights(
        folder / "loras",
        transformer_lora_layers=state,
        weight_name=path.name,
        transformer_lora_adapter_metadata=config,
    )
    record = json.loads((folder / "training.json").read_text())
    record.setdefault("continued", []).append(trainer.report)
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"adapter saved: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plan", choices=sorted(PLANS), default="gpu")
    parser.add_argument("--budget-s", type=float, help="the plan's time budget, overridden")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="train the model in --out further")
    args = parser.parse_args(argv)
    plan = PLANS[args.plan]
    if args.budget_s:
        plan.budget_s = args.budget_s
    from serve_app.engine import pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.resume:
        resume(args.out, plan, device, args.seed)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    train(args.out, plan, device, args.seed)


if __name__ == "__main__":
    main()

"""Train the toy MM-DiT on the Shapes world, on the CPU or a GPU, resumably.

    python -m mmdit_probe.toy.train --out runs/toy --minutes 90      # trains, checkpoints, resumes
    python -m mmdit_probe.toy.train --out runs/toy --export          # writes the shipped weights
    python -m mmdit_probe.toy.train --out runs/more --from-shipped   # continue from the shipped weights
    python -m mmdit_probe.toy.train --out runs/gpu --device cuda --batch 128   # minutes, not hours

Two stages: the near-identity VAE (a few minutes), then the transformer and both text encoders
jointly with the rectified-flow objective (logit-normal timesteps, 10% caption dropout, EMA).
A checkpoint is written every few hundred steps; rerunning the same command continues from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import written_atomically
from .model import CLIP_LENGTH, T5_LENGTH, TEXT_LAYERS, WEIGHTS_DIR, build_pipeline
from .world import caption, render, sample_split_scene, unplaced_caption_is_held_out

WARMUP_STEPS = 500


def make_dataset(n: int, seed: int, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-split scenes as images in [-1, 1] (n, 3, 32, 32) and CLIP token ids (n, CLIP_LENGTH)
    of each scene's caption, with and without its position words (with them where leaving them
    out would give a held-out caption)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_split_scene(rng, held_out=False) for _ in tqdm(range(n), desc="scenes")]
    images = np.stack([render(s)[0] for s in tqdm(scenes, desc="render")])
    placed = [caption(s) for s in scenes]
    unplaced = [caption(s, placed=unplaced_caption_is_held_out(s)) for s in scenes]
    ids = [tokenizer(texts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                     return_tensors="pt").input_ids for texts in (placed, unplaced)]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, *ids


def encode_text(pipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same embeddings `StableDiffusion3Pipeline.encode_prompt` builds, with gradients."""
    hidden, pooled = [], []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(hidden, dim=-1)
    t5 = clip.new_zeros(clip.shape[0], T5_LENGTH, pipe.transformer.config.joint_attention_dim)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)


def train_vae(pipe, pixels: torch.Tensor, steps: int, seed: int) -> None:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    # Decaying to zero sharpens edges, which decide whether a small square still looks square.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in (bar := tqdm(range(steps), desc="vae")):
        x = pixels[torch.randint(len(pixels), (32,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.5f}")
    vae.eval()


@torch.no_grad()
def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Raw (unscaled) VAE latents, deterministic (the posterior mode)."""
    pipe.vae.eval()
    return torch.cat([pipe.vae.encode(x).latent_dist.mode() for x in pixels.split(256)])


def diffusion_modules(pipe) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict(
        {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    )


# What a run is, fixed at its first start (run.json) so that resuming and exporting rebuild the same
# model on the same data. A run.json written before a setting existed was trained with its default.
RUN_DEFAULTS = {
    "text_layers": TEXT_LAYERS,
    # Fraction of training captions without position words ("a large red circle and a small blue
    # square on a white background"), whose layout the model then chooses. The shipped weights use 0.5.
    "unplaced": 0.0,
}


def run_settings(out: Path, **given) -> dict:
    """The run's settings: those of run.json when the run exists (`given` must agree), else
    `given` over RUN_DEFAULTS, written to run.json."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - set(RUN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown run settings {sorted(unknown)}; known: {sorted(RUN_DEFAULTS)}")
    path = out / "run.json"
    if path.exists():
        settings = {**RUN_DEFAULTS, **json.loads(path.read_text())}
        for key, value in given.items():
            if value != settings[key]:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{out} was started with {flag} {settings[key]}; use another --out for {value}")
        return settings
    settings = {**RUN_DEFAULTS, **given}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))
    return settings


def train(out: Path, minutes: float, max_steps: int, seed: int, n_scenes: int, vae_steps: int,
          batch_size: int = 32, lr: float = 1e-3, ema_decay: float = 0.999, from_shipped: bool = False,
          text_layers: int | None = None, unplaced: float | None = None, device: str = "cpu",
          shipped_vae: bool = False) -> None:
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(out, text_layers=text_layers, unplaced=unplaced)
    pipe = build_pipeline(seed, settings["text_layers"])
    shipped_step = 0
    if from_shipped and not (out / "diffusion.pt").exists():
        shipped_step = _load_shipped(pipe, out)
    elif shipped_vae and not (out / "vae.pt").exists():
        _load_shipped(pipe, out, vae_only=True)
    pixels, placed_ids, unplaced_ids = make_dataset(n_scenes, seed, pipe.tokenizer)
    empty_ids = pipe.tokenizer("", padding="max_length", max_length=CLIP_LENGTH, return_tensors="pt").input_ids
    pipe.to(device)
    pixels = pixels.to(device)

    vae_path = out / "vae.pt"
    if vae_path.exists():
        state = torch.load(vae_path, weights_only=True, map_location=device)
        pipe.vae.load_state_dict(state["weights"])
        pipe.vae.register_to_config(**state["config"])
        raw = encode_latents(pipe, pixels)
    else:
        train_vae(pipe, pixels, vae_steps, seed)
        raw = encode_latents(pipe, pixels)
        # Unit-scale latents, as SD3's own scaling and shift factors give for its VAE.
        config = {"shift_factor": raw.mean().item(), "scaling_factor": 1.0 / raw.std().item()}
        pipe.vae.register_to_config(**config)
        torch.save({"weights": pipe.vae.state_dict(), "config": config}, vae_path)
    latents = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    recon_error = evaluate_vae(pipe, pixels[:512])
    print(f"vae reconstruction: mean abs error {recon_error:.4f} (pixels in [-1, 1])")

    model = diffusion_modules(pipe).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=device != "cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    step = shipped_step
    # Warm up whenever Adam starts without its moments (a fresh run, or from shipped weights),
    # counted from that step so that a run resumed during warm-up continues it.
    warmup_from = step
    ckpt_path = out / "diffusion.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].cpu())
        step = state["step"]
        warmup_from = state.get("warmup_from", step - WARMUP_STEPS)  # older checkpoints: warmed up
        print(f"resumed at step {step}")

    def save() -> None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "gen": gen.get_state(), "step": step, "warmup_from": warmup_from}
        with written_atomically(ckpt_path) as temporary:
            torch.save(state, temporary)

    deadline = time.monotonic() + minutes * 60
    bar = tqdm(total=max_steps, initial=step, desc="diffusion")
    losses: list[torch.Tensor] = []
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    while step < max_steps and time.monotonic() < deadline:
        # Every draw is made on the CPU generator, so a run's data and noise do not depend on the device.
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        x0, tokens = latents[idx.to(device)], placed_ids[idx].clone()
        if settings["unplaced"]:  # no extra draw otherwise: runs from before this setting resume on the same stream
            unplace = torch.rand(batch_size, generator=gen) < settings["unplaced"]
            tokens[unplace] = unplaced_ids[idx][unplace]
        tokens[torch.rand(batch_size, generator=gen) < 0.1] = empty_ids
        sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigma, tokens = sigma.to(device), tokens.to(device)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        text, pooled = encode_text(pipe, tokens)
        pred = pipe.transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text,
                                pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        warmup = min(1.0, (step - warmup_from + 1) / WARMUP_STEPS)
        for group in opt.param_groups:
            group["lr"] = lr * warmup
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - ema_decay)
        step += 1
        losses.append(loss.detach())  # no .item() per step: it would wait for the GPU
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{torch.stack(losses[-200:]).mean().item():.4f}")
            del losses[:-200]
        if step % 500 == 0:
            save()
    save()
    bar.close()
    print(f"stopped at step {step}; checkpoint in {ckpt_path}")


@torch.no_grad()
def evaluate_vae(pipe, pixels: torch.Tensor) -> float:
    recon = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
    return (recon.clamp(-1, 1) - pixels).abs().mean().item()


def export(out: Path, seed: int, target: Path = WEIGHTS_DIR) -> None:
    """Write the EMA weights as a stock diffusers pipeline directory (fp16 safetensors)."""
    settings = run_settings(out)
    pipe = build_pipeline(seed, settings["text_layers"])
    vae_state = torch.load(out / "vae.pt", weights_only=True)
    pipe.vae.load_state_dict(vae_state["weights"])
    pipe.vae.register_to_config(**vae_state["config"])
    state = torch.load(out / "diffusion.pt", weights_only=False)
    diffusion_modules(pipe).load_state_dict(state["ema"])
    pipe.to(torch.float16).save_pretrained(target, safe_serialization=True)
    (target / "training.json").write_text(json.dumps({"steps": state["step"], "seed": seed, **settings}))
    print(f"exported step {state['step']} to {target}")


def _load_shipped(pipe, out: Path, source: Path = WEIGHTS_DIR, vae_only: bool = False) -> int:
    """Start from the shipped weights (or only their VAE), writing the VAE to out/vae.pt; returns
    the step the shipped weights were exported at."""
    from diffusers import StableDiffusion3Pipeline

    from ..probe import _dtype_keyword

    shipped = StableDiffusion3Pipeline.from_pretrained(source, text_encoder_3=None, tokenizer_3=None,
                                                       **{_dtype_keyword(): torch.float32})
    parts = ("vae",) if vae_only else ("vae", "transformer", "text_encoder", "text_encoder_2")
    for name in parts:
        # Not strict: a run with fewer text-encoder layers than the shipped model drops the rest.
        missing, _ = getattr(pipe, name).load_state_dict(getattr(shipped, name).state_dict(), strict=False)
        if missing:
            raise ValueError(f"the shipped {name} lacks weights this model needs: {missing[:3]}")
    config = {k: shipped.vae.config[k] for k in ("shift_factor", "scaling_factor")}
    pipe.vae.register_to_config(**config)
    torch.save({"weights": pipe.vae.state_dict(), "config": config}, out / "vae.pt")
    step = json.loads((source / "training.json").read_text())["steps"]
    print(f"starting from the shipped {', '.join(parts)} (step {step})")
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/toy"), help="checkpoint directory")
    parser.add_argument("--minutes", type=float, default=120.0, help="stop (and checkpoint) after this long")
    parser.add_argument("--steps", type=int, default=40_000, help="total diffusion steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=40_000, help="training scenes rendered up front")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--export", action="store_true", help="export the checkpoint's EMA weights and exit")
    parser.add_argument("--text-layers", type=int, default=None,
                        help=f"CLIP text-encoder layers of a new run (default {TEXT_LAYERS}, as shipped; "
                             "1 makes every text token its own word, see toy/model.py)")
    parser.add_argument("--unplaced", type=float, default=None,
                        help="fraction of training captions without position words, for a new run "
                             f"(default {RUN_DEFAULTS['unplaced']}, as shipped; see RUN_DEFAULTS)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--device", default="cpu", help="e.g. cuda; the data and noise are the same on any device")
    parser.add_argument("--from-shipped", action="store_true",
                        help="start from the weights shipped in the package (when --out has no checkpoint)")
    parser.add_argument("--shipped-vae", action="store_true",
                        help="take the shipped VAE and train the diffusion model from scratch")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.export:
        export(args.out, args.seed)
    else:
        train(args.out, args.minutes, args.steps, args.seed, args.scenes, args.vae_steps,
              batch_size=args.batch, lr=args.lr, from_shipped=args.from_shipped, text_layers=args.text_layers,
              unplaced=args.unplaced, device=args.device, shipped_vae=args.shipped_vae)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch peers of parti's models, for `make bench`: the same shapes, the same losses, timed the
way the Rust side times itself. Prints one JSON object on stdout.

  torch_models.py vqgan-step  --preset tiny|small --batch B --rounds R
  torch_models.py parti-step  --preset tiny|350m-slice|350m-ops --batch B --rounds R
  torch_models.py parti-sample --grid G --d-model D --layers L --batch B
  (any of them with --naive-attention: attention as separate ops, to locate a gap, and with
  --device cpu|cuda:N: where to run, the device the Rust side was measured on)

Idiomatic PyTorch rather than a transliteration: fused scaled_dot_product_attention, an in-place
preallocated KV cache, inference_mode for sampling. Architectures mirror nn/, models/src/vqgan.rs
and models/src/parti.rs (pre-norm blocks, separate q/k/v/o projections, exact GELU).
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.output = (nn.Linear(d, d) for _ in range(4))

    def split(self, x):
        b, s, d = x.shape
        return x.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def key_value(self, context):
        return self.split(self.key(context)), self.split(self.value(context))

    def attend(self, x, keys, values, allowed=None):
        b, s, d = x.shape
        queries = self.split(self.query(x))
        if NAIVE_ATTENTION:
            out = naive_attention(queries, keys, values, allowed)
        else:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed)
        return self.output(out.transpose(1, 2).reshape(b, s, d))


# --naive-attention: scores materialised, masked and soft-maxed as separate ops, as Burn's
# autodiff does; the difference to the fused kernel shows where a gap to PyTorch comes from.
NAIVE_ATTENTION = False
PROFILE = ""


def naive_attention(queries, keys, values, allowed):
    scores = queries @ keys.transpose(-2, -1) / math.sqrt(queries.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -1e9)
    return scores.softmax(-1) @ values


class Block(nn.Module):
    def __init__(self, d, heads, mlp, cross=False):
        super().__init__()
        self.norm_attention = nn.LayerNorm(d)
        self.attention = Attention(d, heads)
        self.norm_cross = nn.LayerNorm(d) if cross else None
        self.cross = Attention(d, heads) if cross else None
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x, allowed=None, context=None):
        h = self.norm_attention(x)
        x = x + self.attention.attend(h, *self.attention.key_value(h), allowed)
        return self.cross_and_mlp(x, context)

    def cross_and_mlp(self, x, context):
        if self.cross is not None and context is not None:
            keys, values, allowed = context
            x = x + self.cross.attend(self.norm_cross(x), keys, values, allowed)
        return x + self.mlp(self.norm_mlp(x))


def stack(d, layers, heads, mlp, cross=False):
    return nn.ModuleList(Block(d, heads, mlp, cross) for _ in range(layers))


# ---- ViT-VQGAN -------------------------------------------------------------------------------

VQGAN = {
    # image, patch, (d, layers, heads, mlp), codebook, code_dim
    "tiny": (64, 8, (128, 2, 4, 256), 512, 32),
    "small": (256, 8, (512, 8, 8, 2048), 8192, 32),
}


class VitVqgan(nn.Module):
    def __init__(self, image, patch, vit, codebook, code_dim):
        super().__init__()
        d, layers, heads, mlp = vit
        self.patch, self.grid = patch, image // patch
        values, tokens = patch * patch * 3, self.grid**2
        self.patch_embedding = nn.Linear(values, d)
        self.encoder_positions = nn.Parameter(torch.randn(tokens, d) * 0.02)
        self.encoder = stack(d, layers, heads, mlp)
        self.encoder_norm = nn.LayerNorm(d)
        self.to_codes = nn.Linear(d, code_dim)
        self.codebook = nn.Parameter(torch.randn(codebook, code_dim))
        self.from_codes = nn.Linear(code_dim, d)
        self.decoder_positions = nn.Parameter(torch.randn(tokens, d) * 0.02)
        self.decoder = stack(d, layers, heads, mlp)
        self.decoder_norm = nn.LayerNorm(d)
        self.to_pixels = nn.Linear(d, values)

    def patchify(self, images):
        b, c, h, w = images.shape
        p = self.patch
        x = images.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches):
        b, p, g = patches.shape[0], self.patch, self.grid
        x = patches.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * p, g * p)

    def forward(self, images):
        x = self.patch_embedding(self.patchify(images) * 2 - 1) + self.encoder_positions
        for block in self.encoder:
            x = block(x)
        z = F.normalize(self.to_codes(self.encoder_norm(x)), dim=-1)
        codebook = F.normalize(self.codebook, dim=-1)
        codes = codebook[(z @ codebook.t()).argmax(-1)]
        vq_loss = F.mse_loss(codes, z.detach()) + 0.25 * F.mse_loss(z, codes.detach())
        codes = z + (codes - z).detach()
        x = self.from_codes(codes * math.sqrt(codes.shape[-1])) + self.decoder_positions
        for block in self.decoder:
            x = block(x)
        return torch.sigmoid(self.unpatchify(self.to_pixels(self.decoder_norm(x)))), vq_loss


def vqgan_step(args):
    model = VitVqgan(*VQGAN[args.preset])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    image = VQGAN[args.preset][0]
    images = torch.rand(args.batch, 3, image, image)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(args):
            out, vq_loss = model(images)
            error = out - images
            loss = error.pow(2).mean() + error.abs().mean() + vq_loss
        loss.backward()
        optimizer.step()

    return timed(step, args.rounds) | {"params": sum(p.numel() for p in model.parameters())}


# ---- Parti ------------------------------------------------------------------------------------

PARTI = {
    # vocab, text length, encoder (d, layers, heads, mlp), decoder (d, layers, heads, mlp), grid,
    # codebook, conv window
    "tiny": (1000, 16, (128, 2, 4, 512), (128, 3, 4, 512), 8, 512, 5),
    # The 350M model's width (Parti Table 1) at two layers a side, full 32x32 grid.
    "350m-slice": (16000, 64, (1024, 2, 16, 4096), (1024, 2, 16, 4096), 32, 8192, 11),
    # The 350M slice's ops on tensors too small to compute: what issuing them costs the host.
    "350m-ops": (100, 8, (64, 2, 16, 64), (64, 2, 16, 64), 4, 64, 11),
}


def conv_allowed(grid, window):
    """True where a query may see a key, as models/src/parti.rs conv_allowed (position 0 is BOS)."""
    n = grid * grid
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    half = window // 2
    token = (k - 1).clamp(min=0)
    near = ((q // grid - token // grid).abs() <= half) & ((q % grid - token % grid).abs() <= half)
    return (k <= q) & ((k == 0) | (k == q) | near)


class Parti(nn.Module):
    def __init__(self, vocab, text_length, encoder, decoder, grid, codebook, window, full_every=4):
        super().__init__()
        ed, el, eh, em = encoder
        d, layers, heads, mlp = decoder
        self.grid, self.codebook_size = grid, codebook
        self.text_embedding = nn.Embedding(vocab, ed)
        self.text_positions = nn.Parameter(torch.randn(text_length, ed) * 0.02)
        self.encoder = stack(ed, el, eh, em)
        self.encoder_norm = nn.LayerNorm(ed)
        self.text_projection = nn.Linear(ed, d)
        self.token_embedding = nn.Embedding(codebook + 1, d)
        self.positions = nn.Parameter(torch.randn(grid * grid, d) * 0.02)
        self.blocks = stack(d, layers, heads, mlp, cross=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, codebook)
        n = grid * grid
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        conv = conv_allowed(grid, window)
        self.masks = [
            causal if full_every and layer % full_every == full_every - 1 else conv
            for layer in range(layers)
        ]

    def condition(self, text):
        x = self.text_embedding(text) + self.text_positions[: text.shape[1]]
        for block in self.encoder:
            x = block(x)
        return self.text_projection(self.encoder_norm(x))

    def forward(self, text, targets):
        encoded = self.condition(text)
        bos = torch.full((targets.shape[0], 1), self.codebook_size)
        x = self.token_embedding(torch.cat([bos, targets[:, :-1]], 1)) + self.positions
        for block, allowed in zip(self.blocks, self.masks):
            x = block(x, allowed, (*block.cross.key_value(encoded), None))
        return self.head(self.norm(x))

    @torch.inference_mode()
    def sample_greedy(self, text, limit=None):
        """KV-cached greedy decoding of the whole grid (or its first `limit` tokens); cross
        keys/values once per prompt."""
        encoded = self.condition(text)
        batch, n = text.shape[0], self.grid * self.grid
        contexts = [(*block.cross.key_value(encoded), None) for block in self.blocks]
        heads = self.blocks[0].attention.heads
        d_head = self.positions.shape[1] // heads
        keys = [torch.empty(batch, heads, n, d_head) for _ in self.blocks]
        values = [torch.empty(batch, heads, n, d_head) for _ in self.blocks]
        token = torch.full((batch, 1), self.codebook_size)
        out = []
        for position in range(n if limit is None else limit):
            x = self.token_embedding(token) + self.positions[position]
            for layer, block in enumerate(self.blocks):
                h = block.norm_attention(x)
                k, v = block.attention.key_value(h)
                keys[layer][:, :, position] = k[:, :, 0]
                values[layer][:, :, position] = v[:, :, 0]
                allowed = self.masks[layer][position : position + 1, : position + 1]
                seen = slice(0, position + 1)
                x = x + block.attention.attend(h, keys[layer][:, :, seen], values[layer][:, :, seen], allowed)
                x = block.cross_and_mlp(x, contexts[layer])
            token = self.head(self.norm(x)).argmax(-1)
            out.append(token)
        return torch.cat(out, 1)


def parti_step(args):
    vocab, text_length, *_ = spec = PARTI[args.preset]
    model = Parti(*spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    text = torch.randint(5, vocab, (args.batch, text_length))
    targets = torch.randint(0, model.codebook_size, (args.batch, model.grid**2))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(args):
            logits = model(text, targets)
            loss = F.cross_entropy(logits.reshape(-1, model.codebook_size), targets.reshape(-1))
        loss.backward()
        optimizer.step()

    return timed(step, args.rounds) | {"params": sum(p.numel() for p in model.parameters())}


def parti_sample(args):
    d, heads = args.d_model, max(args.d_model // 64, 1)
    model = Parti(
        1000, 16, (d, 2, heads, 4 * d), (d, args.layers, heads, 4 * d), args.grid, 8192, 11
    ).eval()
    text = 5 + torch.arange(args.batch * 16).remainder(900).view(args.batch, 16)
    model.sample_greedy(text, limit=2)  # warm-up: allocator, kernels (a GPU's first launches)
    synchronize()
    started = time.perf_counter()
    tokens = model.sample_greedy(text)
    synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens_per_second": tokens.numel() / seconds, "tokens": tokens.shape[1]}


def autocast(args):
    """bf16 autocast for `--precision bf16` (forward and loss; backward follows), as ours."""
    device = torch.get_default_device().type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def synchronize():
    """Waits for queued GPU work, so a wall-clock time covers it (a no-op on the CPU)."""
    if torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def timed(step, rounds):
    step()  # warm-up: allocator, kernels, optimizer state
    synchronize()
    times = []
    for index in range(rounds):
        profiler = None
        if PROFILE and index == rounds - 1:  # the last step, as ours records it
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.get_default_device().type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            profiler.__enter__()
        started = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - started)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(PROFILE)
    return {"ms_per_step": 1000 * statistics.median(times), "rounds_ms": [1000 * t for t in times]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["vqgan-step", "parti-step", "parti-sample"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--naive-attention", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--profile", default="", help="Chrome trace of the last timed step")
    args = parser.parse_args()
    # Every tensor and parameter is created there, so the models need no .to() calls.
    torch.set_default_device(args.device)
    global NAIVE_ATTENTION, PROFILE
    NAIVE_ATTENTION = args.naive_attention
    PROFILE = args.profile
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = {"vqgan-step": vqgan_step, "parti-step": parti_step, "parti-sample": parti_sample}
    result = run[args.what](args)
    result |= {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(torch.get_default_device()),
        "attention": "naive" if NAIVE_ATTENTION else "fused",
        "precision": args.precision,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

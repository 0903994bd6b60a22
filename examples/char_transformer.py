"""A character-level transformer language model (einops) trained on Python's own standard
library sources, which every Python installation has; it samples some "Python" at the end.

    python examples/char_transformer.py            # ~3-5 min on a laptop CPU (compiled)
    python examples/char_transformer.py --fast     # tiny and eager, a few seconds
"""

from __future__ import annotations

import argparse
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import loopkit as lk
from loopkit import optim
from loopkit.cli import positive_int

SOURCES = ["textwrap.py", "string.py", "fnmatch.py", "glob.py", "shlex.py", "bisect.py",
           "heapq.py", "colorsys.py", "copy.py", "functools.py", "dataclasses.py", "enum.py"]  # fmt: skip


def corpus(max_chars: int | None = None) -> str:
    """The text of some standard-library modules (ASCII only)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / name).read_text(encoding="utf-8") for name in SOURCES)
    text = text.encode("ascii", "ignore").decode()
    return text[:max_chars] if max_chars else text


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(self.ln1(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads
        )
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.drop(self.proj(rearrange(att @ v, "b h t d -> b t (h d)")))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharLM(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, dropout) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def loss_fn(net, batch):
    x, y = batch
    logits = net(x)
    return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(y, "b t -> (b t)"))


def windows(data: torch.Tensor, context: int, batch_size: int, steps: int, seed: int):
    """``steps`` batches of random (input, next-character) windows, reproducible from seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch_size,), generator=g)
        idx = start[:, None] + torch.arange(context + 1)
        chunk = data[idx]
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


@torch.no_grad()
def sample(model: nn.Module, state: lk.TrainState, prompt: torch.Tensor, n: int, context: int,
           temperature: float = 0.8, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """Autoregressive sampling with the trained state's params (eval mode)."""
    model.load_state_dict(state.params | state.buffers)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = prompt[None]
    for _ in range(n):
        logits = model(idx[:, -context:])[:, -1] / temperature
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[0]


def main(steps: int = 1500, context: int = 64, dim: int = 128, layers: int = 4, heads: int = 4,
         batch_size: int = 32, compile: bool = True, max_chars: int | None = None,
         sample_chars: int = 400) -> dict:  # fmt: skip
    torch.manual_seed(0)
    text = corpus(max_chars)
    chars = sorted(set(text))
    encode = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([encode[c] for c in text])
    split = int(0.9 * len(data))
    model = CharLM(len(chars), context, dim, layers, heads, dropout=0.1)
    opt = optim.adamw(
        lr=optim.schedules.warmup_cosine(1e-3, min(100, steps // 10), steps), weight_decay=0.1
    )
    state = lk.TrainState.create(model, opt, seed=0)
    step = lk.train_step(model, loss_fn, opt, clip_norm=1.0, compile=compile)
    train = windows(data[:split], context, batch_size, steps, seed=1)
    val = windows(data[split:], context, batch_size, 8, seed=2)
    print(f"{len(text)} characters, vocabulary {len(chars)}, "
          f"{sum(p.numel() for p in state.params.values())} parameters")  # fmt: skip
    state = lk.fit(step, state, train, hooks=[lk.hooks.ProgressBar(refresh=50)])
    val_loss = lk.evaluate(lk.eval_step(model, loss_fn), state, val)["loss"]
    print(f"validation loss {val_loss:.3f} nats/char (uniform: {math.log(len(chars)):.3f})")
    prompt = torch.tensor([encode[c] for c in "def "])
    out = sample(model, state, prompt, sample_chars, context)
    text_out = "".join(chars[i] for i in out.tolist())
    print("--- sample ---\n" + text_out)
    return {"val_loss": val_loss, "uniform": math.log(len(chars)), "sample": text_out}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--fast", action="store_true", help="tiny and eager (for CI)")
    args = parser.parse_args()
    if args.fast:
        main(steps=args.steps or 30, context=32, dim=32, layers=1, heads=2, batch_size=16,
             compile=False, max_chars=20_000, sample_chars=100)  # fmt: skip
    else:
        main(steps=args.steps or 1500)

"""Helpers for the distributed optimizer tests: a toy MoE-shaped model and a gloo process launcher."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

VOCAB, TOKENS_PER_STEP = 11, 8


class ToyMoE(nn.Module):
    """Matrices whose dimensions 2 and 4 do not divide, a 3-expert stack whose expert 2 never gets a token,
    a matrix that never gets a gradient, an embedding, a norm weight and an LM head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed_tokens = nn.Embedding(VOCAB, 6)
        self.w1 = nn.Parameter(torch.randn(7, 6, generator=gen) * 0.3)
        self.w2 = nn.Parameter(torch.randn(5, 7, generator=gen) * 0.3)
        self.experts = nn.Parameter(torch.randn(3, 5, 6, generator=gen) * 0.3)
        self.norm = nn.Parameter(torch.ones(5))
        self.unused = nn.Parameter(torch.randn(4, 3, generator=gen))
        self.lm_head = nn.Linear(5, VOCAB, bias=False)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.randn(VOCAB, 6, generator=gen))
            self.lm_head.weight.copy_(torch.randn(VOCAB, 5, generator=gen) * 0.3)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        h = torch.tanh(x @ self.w1.T) @ self.w2.T
        h = h + torch.einsum("tij,tj->ti", self.experts[ids % 2], x)  # experts 0 and 1 only
        return F.cross_entropy(self.lm_head(h * self.norm), targets)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return (torch.randint(0, VOCAB, (TOKENS_PER_STEP,), generator=gen),
            torch.randint(0, VOCAB, (TOKENS_PER_STEP,), generator=gen))


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, targets = batch(step)
    return ids.chunk(world)[rank], targets.chunk(world)[rank]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` fresh gloo processes (a fresh process group each call).

    Forked, not spawned: the children inherit the imported torch instead of importing it again (seconds each
    on a busy 2-core machine). Nothing in the parent has started a process group or a CUDA context.
    """
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="fork")

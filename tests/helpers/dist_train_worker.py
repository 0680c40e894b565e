"""Run under `torchrun --nproc_per_node 2`: train a few steps, then dump this rank's teacher/centre, its logged rows
and the losses it computed itself (local, one per micro-batch) for comparison.

$INF_RANK / $INF_STEP: that rank's loss is made +inf in the forward of optimizer step $INF_STEP (0-based; a constant
added, so its gradients stay finite). $SKIPPED_SHARDS_RANK: that rank's loader reports one skipped shard.
"""

import os
import sys
from pathlib import Path

import torch

from matpac_fast.train_config import resolve
from matpac_fast.trainer import Trainer

cfg, _ = resolve(sys.argv[1:])
trainer = Trainer(cfg)
rank = trainer.accelerator.process_index
inf_rank, inf_step = int(os.environ.get("INF_RANK", -1)), int(os.environ.get("INF_STEP", -1))
if rank == int(os.environ.get("SKIPPED_SHARDS_RANK", -1)):
    trainer.data.skipped_shards = lambda: 1

local: list[float] = []
inner = getattr(trainer.model, "module", trainer.model)  # the DDP-wrapped module
forward = inner.forward


def traced(batch, state):
    loss, stats = forward(batch, state)
    if rank == inf_rank and trainer.step == inf_step:
        loss = loss + float("inf")
    local.append(float(loss.detach()))
    return loss, stats


inner.forward = traced
result = trainer.train()
model = trainer.raw_model
state = {k: v.detach().clone() for k, v in model.state_dict().items()}
rows = result["history"]
torch.save({"state": state, "losses": torch.tensor([row["loss"] for row in rows]), "local": torch.tensor(local),
            "steps": [row["step"] for row in rows], "skipped_steps": [row["skipped_steps"] for row in rows],
            "skipped_shards": [row["skipped_shards"] for row in rows],
            "nonfinite_total": float(trainer.nonfinite_total), "world": trainer.accelerator.num_processes},
           Path(cfg.run.out) / f"rank{rank}.pt")

"""Run under `torchrun --nproc_per_node 2`: train a few steps, then dump this rank's teacher/centre for comparison."""

import sys
from pathlib import Path

import torch

from matpac_fast.train_config import resolve
from matpac_fast.trainer import Trainer

cfg, _ = resolve(sys.argv[1:])
trainer = Trainer(cfg)
result = trainer.train()
model = trainer.raw_model
state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("teacher") or k == "center"}
losses = torch.tensor([row["loss"] for row in result["history"]])
rank = trainer.accelerator.process_index
torch.save({"state": state, "losses": losses, "world": trainer.accelerator.num_processes},
           Path(cfg.run.out) / f"rank{rank}.pt")

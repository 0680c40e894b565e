"""Entry point: `accelerate launch train.py ...` (multi-GPU, see configs/) or `python train.py ...` (one device).

`python train.py --help` lists every option; the loop lives in matpac_fast/trainer.py (`matpac-train` is the same
entry point, matpac_fast/train_cli.py).
"""

if __name__ == "__main__":
    from matpac_fast.train_cli import command  # light: the trainer (torch, seconds) is imported inside main's guard

    command()

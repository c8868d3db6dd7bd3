"""Train a model: `python train.py model=mlp data=mnist` (see README.md)."""

from trainer.cli import train_main

if __name__ == "__main__":
    train_main()

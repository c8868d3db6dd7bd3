"""Evaluate a checkpoint on the test set: `python eval.py ckpt_path=...` (see README.md)."""

from trainer.cli import eval_main

if __name__ == "__main__":
    eval_main()

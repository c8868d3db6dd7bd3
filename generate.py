"""Sample text from a checkpoint: `python generate.py ckpt_path=... prompt="ROMEO:"`."""

from trainer.cli import generate_main

if __name__ == "__main__":
    generate_main()

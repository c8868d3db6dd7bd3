"""Export a checkpoint: `python scripts/export.py outputs/.../checkpoints/best.pt [--out DIR]`.

Writes model.safetensors (LoRA merged) and model.yaml; see docs/finetune.md.
"""

from trainer.finetune.export import main

if __name__ == "__main__":
    main()

"""Diffusion models as unlearning targets: the shared DDPM core (ddpm, training) and, per model kind, its
engines (salun: class forgetting for class-conditional DDPMs)."""

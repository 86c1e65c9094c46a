"""rpo_core: subject-driven fine-tuning with RPO (λ-Harmonic reward + preference loss). Imports r0_core only."""

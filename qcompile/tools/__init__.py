"""User-facing commands and studies: CLI, demo, deploy, diagrams, analyses, experiments, training loop, data."""

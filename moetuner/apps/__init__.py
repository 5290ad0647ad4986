"""Console entry points: each a thin `@hydra.main` around a pure typed function."""

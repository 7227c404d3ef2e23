"""Training: teachers on real data, and students from synthetic images."""

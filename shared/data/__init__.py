"""Offline datasets: scikit-learn digits (CPU demo and CI) and the CIFAR-10 JPEG copy (GPU)."""

"""A class-conditional image generator for the `generator` synthesis method (no text model, no pretrained parts).

Input: a per-class vector (fixed random orthogonal, or learned) concatenated with a per-image variation: the output
of a noisy linear layer that is redrawn every loop (the only randomness), or a trainable latent z. The class vector
passes through unchanged, so even a fresh noise draw (a serving forward) keeps the class. Body:
linear to a small feature map, then (upsample x2, conv3x3, BN, LeakyReLU) stages to the teacher's input size, and
a sigmoid: pixels in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import GeneratorConfig


def upsampling_stages(image_size: int) -> tuple[int, int]:
    """(stages, start size): two stages up to 32 px (16 px digits start at 4, CIFAR at 8), one more per doubling."""
    stages = 2 + max(0, math.ceil(math.log2(image_size / 32)))
    return stages, math.ceil(image_size / 2 ** stages)


def slot_of_each_label(y: torch.Tensor) -> torch.Tensor:
    """For each image, how many earlier images in the batch share its class (0, 1, 2, ...)."""
    same = y[:, None] == y[None, :]
    return torch.tril(same, diagonal=-1).sum(dim=1)


class ClassConditionalGenerator(nn.Module):
    def __init__(self, num_classes: int, out_chans: int, image_size: int, cfg: GeneratorConfig):
        super().__init__()
        self.num_classes, self.image_size, self.noise = num_classes, image_size, cfg.noise
        self.embed_dim, self.noise_dim = cfg.embed_dim, cfg.noise_dim
        if cfg.embedding == "orthogonal":
            basis = torch.empty(num_classes, cfg.embed_dim)
            nn.init.orthogonal_(basis, generator=torch.Generator().manual_seed(0))
            self.register_buffer("class_vectors", basis * math.sqrt(cfg.embed_dim))  # unit-variance entries
        else:
            self.class_embedding = nn.Embedding(num_classes, cfg.embed_dim)
        code_dim = cfg.embed_dim + cfg.noise_dim
        self.stages, self.start = upsampling_stages(image_size)
        wide = 2 * cfg.width
        self.project = nn.Linear(code_dim, wide * self.start ** 2)
        self.project_norm = nn.BatchNorm2d(wide)
        blocks: list[nn.Module] = []
        channels = wide
        for s in range(self.stages):
            out = cfg.width if s == self.stages - 1 else wide
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            channels = out
        self.body = nn.Sequential(*blocks)
        self.to_pixels = nn.Conv2d(channels, out_chans, 3, padding=1)
        # The noisy layer: one (noise_dim x embed_dim) matrix per slot, so the k-th image of a class in a batch gets
        # the k-th matrix and images of one class differ. Redrawn every loop, trained within it, never saved.
        self.noise_params = nn.ParameterList()

    def class_vector(self, y: torch.Tensor) -> torch.Tensor:
        return self.class_vectors[y] if hasattr(self, "class_vectors") else self.class_embedding(y)

    def redraw_noise(self, slots: int, gen: torch.Generator) -> nn.Parameter:
        """A fresh noisy layer from N(0, 1/embed_dim) (unit-variance codes), trainable for one loop."""
        w = torch.randn(slots, self.noise_dim, self.embed_dim, generator=gen) / math.sqrt(self.embed_dim)
        self.noise_params = nn.ParameterList([nn.Parameter(w.to(self.project.weight.device))])
        return self.noise_params[0]

    def code(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        e = self.class_vector(y)
        if self.noise == "latent":
            if z is None:
                raise ValueError("noise 'latent' needs z")
            return torch.cat([e, z], dim=1)
        if not len(self.noise_params):
            raise ValueError("no noisy layer: call redraw_noise first")
        weight = self.noise_params[0]
        slots = slot_of_each_label(y)
        if len(weight) <= int(slots.max()):
            raise ValueError(f"the noisy layer has {len(weight)} slots; this batch needs {int(slots.max()) + 1}")
        return torch.cat([e, torch.bmm(weight[slots], e[:, :, None]).squeeze(2)], dim=1)

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project(self.code(y, z)).view(len(y), -1, self.start, self.start)
        h = self.body(F.leaky_relu(self.project_norm(h), 0.2))
        pixels = torch.sigmoid(self.to_pixels(h))
        if pixels.shape[-1] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return pixels

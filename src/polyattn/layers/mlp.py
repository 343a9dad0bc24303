"""Channel mixers: the ViT MLP and the gated (GLU-family) MLP used by LLaMA, iLLaMA and LightNet."""

import torch
from torch import nn


def llama_hidden_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU hidden size: int(2·4·dim/3), optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class Mlp(nn.Module):
    """Two-layer MLP `fc2(act(fc1(x)))` (ViT/DeiT), with dropout `drop` on the hidden activations and on the output.

    `output_drop=False` leaves the output undropped (the feed-forward of the arXiv 2412.06106 authors' code, whose
    only dropout sits after the activation).
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, bias: bool = True,
                 drop: float = 0.0, output_drop: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(drop)
        self.output_drop = output_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.drop(self.act(self.fc1(x))))
        return self.drop(y) if self.output_drop else y


class GatedMlp(nn.Module):
    """Gated MLP `w2(act(w1 x) ⊙ w3 x)` (arXiv 2002.05202); with SiLU this is SwiGLU.

    Names follow LLaMA (`w1` gate, `w3` up, `w2` down) so released checkpoints map one to one.
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.SiLU, bias: bool = False,
                 drop: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(self.drop(self.act(self.w1(x)) * self.w3(x))))

"""The expert matrix products alone: what the matrix-product library charges for few rows per weight matrix.

A batched product of `E` experts' `C` rows each, `[E, C, d] @ [E, d, f]`, against one dense product with the same
arithmetic, `[E * C, d] @ [d, f]`, and against a batched product with a single row per expert (which does little
arithmetic and mostly streams the `E` weight matrices from memory). The layer suite's `balanced_experts` floor is
made of such batched products; this suite shows how far from a dense product's efficiency they are for the row counts
the layer and model cases produce.
"""

from dataclasses import dataclass

import torch

from . import device
from .timing import compare


@dataclass
class ProductCase:
    d_model: int
    d_ff: int
    num_experts: int
    rows_per_expert: int

    @property
    def name(self) -> str:
        return f"E{self.num_experts}x{self.rows_per_expert}rows"


def product_variants(case: ProductCase) -> dict:
    """Callables for `compare`: the dense product of equal arithmetic, the batched product, one row per expert."""
    generator = device.generator(0)
    experts, rows, d_model, d_ff = case.num_experts, case.rows_per_expert, case.d_model, case.d_ff
    weights = torch.randn(experts, d_ff, d_model, generator=generator)  # `[E, out, in]`, as the experts hold them
    tokens = torch.randn(experts, rows, d_model, generator=generator)
    one_row = tokens[:, :1].contiguous()
    return {
        "dense_same_arithmetic": lambda: torch.mm(tokens.view(experts * rows, d_model), weights[0].t()),
        "batched": lambda: torch.bmm(tokens, weights.transpose(1, 2)),
        "one_row_per_expert": lambda: torch.bmm(one_row, weights.transpose(1, 2)),
    }


def measure(case: ProductCase, rounds: int) -> dict:
    return compare(product_variants(case), baseline="dense_same_arithmetic", rounds=rounds)

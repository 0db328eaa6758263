"""Matrix products of stacked expert weights with their tokens, as autograd functions.

Autograd through `weight[e]` (one expert's slice of a stacked weight) allocates and zero-fills a full `[E, out, in]`
gradient for every expert and sums them. These functions instead write each expert's weight gradient into one
uninitialised `[E, out, in]` buffer, zeroing only the experts that received no tokens, and return it in the
parameter's own layout so that autograd stores it without a copy.

Two layouts of the tokens, each best in its own regime:
- grouped: `[M, in]` rows sorted by expert, one `mm` per expert. Best when experts receive many rows each.
- padded: `[E, C, in]`, every expert's rows padded to `C`, one batched `bmm`. Best when experts receive few rows,
  where a loop of small `mm` calls leaves the cores idle between calls.
"""

import torch


class GroupedLinear(torch.autograd.Function):
    """`output[rows of e] = input[rows of e] @ weight[e].T` for rows grouped by expert.

    Args:
        input: `[M, in]`, rows grouped by expert.
        weight: `[E, out, in]`.
        group_sizes: `E` ints (a Python list: sizes decide the loop, not the graph), summing to `M`.

    Returns:
        `[M, out]`.
    """

    @staticmethod
    def forward(ctx, input, weight, group_sizes):
        ctx.save_for_backward(input, weight)
        ctx.group_sizes = group_sizes
        output = input.new_empty(input.shape[0], weight.shape[1])
        for expert, (start, end) in _nonempty_groups(group_sizes):
            torch.mm(input[start:end], weight[expert].t(), out=output[start:end])
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        groups = list(_nonempty_groups(ctx.group_sizes))
        grad_output = grad_output.contiguous()
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = input.new_empty(input.shape)
            for expert, (start, end) in groups:
                torch.mm(grad_output[start:end], weight[expert], out=grad_input[start:end])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
            for expert, size in enumerate(ctx.group_sizes):
                if size == 0:
                    grad_weight[expert].zero_()
            for expert, (start, end) in groups:
                torch.mm(grad_output[start:end].t(), input[start:end], out=grad_weight[expert])
        return grad_input, grad_weight, None


class PaddedLinear(torch.autograd.Function):
    """`output[e] = input[e] @ weight[e].T` for every expert at once.

    Args:
        input: `[E, C, in]`, each expert's rows padded to `C`.
        weight: `[E, out, in]`.

    Returns:
        `[E, C, out]`.
    """

    @staticmethod
    def forward(ctx, input, weight):
        ctx.save_for_backward(input, weight)
        return torch.bmm(input, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.bmm(grad_output, weight)
        if ctx.needs_input_grad[1]:
            # Written as [E, out, in] directly, the parameter's layout, rather than transposed from [E, in, out].
            grad_weight = torch.bmm(grad_output.transpose(1, 2), input)
        return grad_input, grad_weight


def _nonempty_groups(group_sizes):
    """`(expert, (start, end))` for every expert with at least one row."""
    start = 0
    for expert, size in enumerate(group_sizes):
        if size:
            yield expert, (start, start + size)
        start += size

"""Attention computes what `nn.MultiheadAttention` computes with the same parameters (the layout the released
checkpoints use), forward and backward, for self-attention and for the global blocks' cross-attention."""

import pytest
import torch

from model.blocks import Attention


def twin_attentions(dim: int, heads: int) -> tuple[Attention, torch.nn.MultiheadAttention]:
    ours = Attention(dim, heads).double()
    reference = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        for parameter in (ours.in_proj_bias, ours.out_proj.weight, ours.out_proj.bias):
            parameter.normal_()  # no zeros: every term of the projections counts
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.parametrize(("query_length", "context_length"), [(1, 50), (3, 17), (5, None)])
def test_attention_equals_multihead_attention_forward_and_backward(query_length, context_length):
    torch.manual_seed(0)
    ours, reference = twin_attentions(dim=24, heads=4)
    x = torch.randn(2, query_length, 24, dtype=torch.float64, requires_grad=True)
    context = None if context_length is None else torch.randn(2, context_length, 24, dtype=torch.float64,
                                                               requires_grad=True)
    keys = x if context is None else context
    expected = reference(x, keys, keys, need_weights=False)[0]
    actual = ours(x, context)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)

    inputs = [x] + ([] if context is None else [context])
    upstream = torch.randn_like(expected)
    grads_ours = torch.autograd.grad(actual, inputs + list(ours.parameters()), upstream)
    grads_reference = torch.autograd.grad(expected, inputs + list(reference.parameters()), upstream)
    for mine, theirs in zip(grads_ours, grads_reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)

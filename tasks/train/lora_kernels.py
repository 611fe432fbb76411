"""Fast paths of LoRA training on small models: packed-row SDPA attention and the fused LoRA linear.

Both compute what transformers and peft compute (up to float rounding); tasks/train/finetune.py switches them on
where measurements showed them faster.
"""

from __future__ import annotations

from typing import Any

import torch

PACKED_ATTENTION = "basesearch_packed_sdpa"  # attention implementation name registered below


def packed_sdpa_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    dropout: float = 0.0, scaling: float | None = None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Variable-length causal attention over packed rows: one SDPA call (is_causal, no mask) per row.

    A block-diagonal mask over the whole packed sequence would make SDPA compute (and on GPU, pick a slower
    kernel for) every row against every other and then throw it away: cost grows with the square of the pack's
    length. Attending row by row costs what the rows cost alone. The rows are cut with `split`, whose backward
    is one concatenation; slicing each row out would cost a full-size zero-filled gradient per row and tensor
    (measured on the demo shape: ~20% more time in attention). Laying the rows out padded for one batched call
    measured slower still. `cu_seq_lens_q` holds the rows' boundaries (0, end of row 1, ..., total), on the CPU.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("packed attention needs one packed row and cu_seq_lens_q")
    lengths = cu_seq_lens_q.diff().tolist()
    outs = [
        sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outs, dim=1), None


def _register_packed_attention() -> None:
    """Make PACKED_ATTENTION a transformers attention implementation (with no mask function: none is built)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


class _FusedLora(torch.autograd.Function):
    """y = x (W + s B A)^T + bias as one matmul; backward gives x, A and B their gradients, W (frozen) none."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        """One addmm builds the merged weight (r * in * out FLOPs, no token factor), one linear applies it."""
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scale)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scale = scale
        return torch.nn.functional.linear(x, merged, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of A and B by the cheaper route for this many tokens (see the comment below)."""
        x, merged, a, b = ctx.saved_tensors
        s, r, (fan_out, fan_in) = ctx.scale, a.shape[0], merged.shape
        g2, x2 = grad.reshape(-1, fan_out), x.reshape(-1, fan_in)
        n = g2.shape[0]
        grad_x = grad @ merged if ctx.needs_input_grad[0] else None
        # Multiply-adds for n tokens: the dense route forms dW = g^T x (n*in*out) and projects it on A and B
        # (2*r*in*out); the thin route never forms dW: (g B)^T x and g^T (x A^T) cost 2*n*r*(in+out). At the demo's
        # width (96 -> 256, r=16, ~540 tokens per step) the MLP takes the thin route, attention the dense one.
        if n * fan_in * fan_out + 2 * r * fan_in * fan_out <= 2 * n * r * (fan_in + fan_out):
            dw = g2.t() @ x2
            grad_a, grad_b = (b.t() @ dw).mul_(s), (dw @ a.t()).mul_(s)
        else:
            grad_a, grad_b = ((g2 @ b).t() @ x2).mul_(s), (g2.t() @ (x2 @ a.t())).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LoRA linear as one matmul with W + scale * B @ A (the same function as peft's three-matmul forward)."""
    name, base, dev = self.active_adapters[0], self.base_layer, x.device.type
    # Under autocast (CUDA bf16) run the whole layer in the autocast dtype, as autocast would run peft's matmuls.
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    bias = None if base.bias is None else base.bias.to(dtype)
    with torch.autocast(dev, enabled=False):
        return _FusedLora.apply(x.to(dtype), base.weight.to(dtype), bias, self.lora_A[name].weight.to(dtype),
                                self.lora_B[name].weight.to(dtype), self.scaling[name])


def fuse_small_loras(model: torch.nn.Module) -> list[Any]:
    """Switch LoRA layers whose factored form is slow to the fused W + s*B@A form; return the layers switched.

    peft's factored path runs three matmuls forward (one full-size, two thin) and six backward, each a separate
    autograd node; the fused path (_FusedLora) runs one full-size matmul forward and, backward, the input's
    gradient plus the cheaper route to A's and B's. Its price is a merged in x out weight per layer, built each
    call and kept for the backward pass: negligible on narrow models (the demo zoo: faster steps on CPU), a
    second copy of the weights on 7B-class ones. So it is used where the merged weight is small next to the
    factored path's thin-matmul work, 2*in*out <= 12*r*(in+out): true for the demo's 96-wide layers (r=16),
    false at 4096 wide, where peft's path stays.
    Only plain LoRA layers qualify (one active adapter, no dropout, no DoRA, nn.Linear base). Loss and gradients
    are the same up to float rounding; undo with unfuse_loras.
    """
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    done = []
    for mod in model.modules():
        if not isinstance(mod, LoraLinear) or len(mod.active_adapters) != 1 or mod.merged:
            continue
        name = mod.active_adapters[0]
        base = mod.base_layer
        if (name not in mod.lora_A or not isinstance(base, torch.nn.Linear) or mod.fan_in_fan_out
                or not isinstance(mod.lora_dropout[name], torch.nn.Identity) or mod.use_dora.get(name)
                or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
            continue
        r, fan_in, fan_out = mod.r[name], base.in_features, base.out_features
        if 2 * fan_in * fan_out <= 2 * 6 * r * (fan_in + fan_out):
            mod.forward = _fused_lora_forward.__get__(mod)
            done.append(mod)
    return done


def unfuse_loras(layers: list[Any]) -> None:
    """Give the layers fuse_small_loras switched their peft forward back."""
    for mod in layers:
        del mod.forward

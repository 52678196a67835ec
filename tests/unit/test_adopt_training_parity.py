"""Adopted HF MoE models train like the transformers model they came from: same loss, same gradient for
every parameter (fp32, train mode, batch 3, with and without left padding).

    /work/main/.venv/bin/python -m pytest -q tests/unit/test_adopt_training_parity.py

Oracle: the unpatched transformers model. The router loss is switched off on both sides
(``aux_loss_coef=0``; transformers adds its own only with ``output_router_logits``), so the loss is the LM
loss and every gradient must agree. Parameter names map one to one, except Qwen2-MoE's ``shared_expert``
(ours: ``shared_experts``), ``gate`` → ``router`` and ``experts.*`` (ours hold the same fused tensors).
"""

from __future__ import annotations

import copy

import pytest
import torch

import switchyard as sy

from test_patch import MOE_MODELS, build, ids

TOL = {"atol": 1e-6, "rtol": 1e-5}


def _ours(name: str) -> str:
    return name.replace(".shared_expert.", ".shared_experts.").replace(".gate.weight", ".router.weight")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("model_type", sorted(MOE_MODELS))
def test_loss_and_every_gradient_match_transformers(model_type, masked):
    # DeepSeek-V3's MLA with 2 kv heads breaks transformers' own sdpa path under a padding mask
    extra = {"num_key_value_heads": 4} if model_type == "deepseek_v3" else {}
    hf = build(model_type, **MOE_MODELS[model_type], **extra).train()
    model = sy.patch_model(copy.deepcopy(hf), overrides={"aux_loss_coef": 0.0}).train()
    x = ids(batch=3)
    kwargs = {"labels": x}
    if masked:
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        mask[2, :1] = 0
        kwargs["attention_mask"] = mask
    ref, out = hf(x, **kwargs), model(x, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    ref.loss.backward()
    out.loss.backward()
    ours = dict(model.named_parameters())
    checked = 0
    for name, param in hf.named_parameters():
        if param.grad is None:
            continue
        mine = ours[_ours(name)]
        torch.testing.assert_close(mine.grad, param.grad, **TOL, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(ours)  # every parameter of ours was compared

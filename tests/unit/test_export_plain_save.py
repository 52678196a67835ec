"""transformers' own ``model.save_pretrained`` of a patched model, read back by plain
``AutoModelForCausalLM.from_pretrained``: it loads without an error, reports the MoE tensors as UNEXPECTED and the
FFN / expert tensors it looks for as MISSING, and initialises those afresh, so the outputs differ from the model's.
docs/upcycling.md must say exactly that (it used to say "not loadable"). Oracle: transformers' loader itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import switchyard as sy
from tiny_models import build, build_moe, ids

DOC = Path(__file__).resolve().parents[2] / "docs" / "upcycling.md"


@pytest.mark.parametrize("mode", ["upcycle", "adopt"])
def test_a_plain_save_of_a_patched_model_loads_silently_wrong_as_the_doc_says(mode, tmp_path):
    if mode == "upcycle":
        model = sy.patch_model(build("llama", intermediate_size=48), sy.MoEConfig(num_experts=4, top_k=2))
    else:
        model = sy.patch_model(build_moe("mixtral"))
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]
    assert all(".mlp." in key for key in info["missing_keys"] | info["unexpected_keys"])
    with torch.no_grad():
        assert not torch.allclose(loaded.eval()(ids()).logits, model(ids()).logits, atol=1e-3)

    doc = " ".join(DOC.read_text().split())
    assert "not loadable" not in doc
    said = re.search(r"plain `AutoModelForCausalLM.from_pretrained` loads it without an error, but silently wrong"
                     r".*UNEXPECTED.*MISSING.*initialises those afresh.*`switchyard.save_pretrained` / "
                     r"`sy.from_pretrained`.*`switchyard export`", doc)
    assert said, "docs/upcycling.md no longer says what a plain from_pretrained of such a save does"

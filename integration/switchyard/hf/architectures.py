"""Dense-FFN adapters: where each transformers family keeps its FFN, how to read it, how to replace it.

One adapter per *weight layout*, not per model: Llama, Mistral, Qwen, Gemma … all store
``mlp.gate_proj/up_proj/down_proj`` and share the ``llama`` adapter; adding a family is one entry in
``ADAPTERS``. An adapter answers four questions for ``patch_model``:

* ``layers(model)`` / ``sites(model)``: the decoder layers, and one ``FFNSite`` (parent module +
  attribute) per layer, named as in ``model.named_modules()``;
* ``read(site, config)``: the FFN's weights as a ``DenseFFN`` in nn.Linear layout ``[out, in]`` —
  detached *views* of the model's parameters (Conv1D transposes and fused halves are views too), so
  reading copies nothing; the upcycling initializers copy what each expert needs;
* ``install(site, moe)``: put the MoE layer (any leading shape ``[..., H]`` in and out) where the FFN was.

Weights that a read would get wrong — peft adapter layers, ZeRO-3 shards, accelerate-offloaded or quantized
storage — are refused (``refuse_*``: model-wide by ``patch_model`` on entry, per module here and in ``adopt``)
before anything is read.

Every ``model_type`` below was checked against ``modeling_<type>.py`` of transformers 5.24: the FFN
forward is exactly ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))`` with the activation named
by the config, and nothing else inside the module (no multipliers, sub-norms or inner dropout), except
where a replaced module's dropout is reported by ``install``. Families with extras (Falcon-H1's
multipliers, BitNet's sub-norm) are deliberately absent: reading them as plain FFNs would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from switchyard.activations import ACTIVATIONS, get_activation
from switchyard.log import get_logger

log = get_logger(__name__)


@dataclass
class DenseFFN:
    """One dense FFN in switchyard's layout (nn.Linear convention ``[out, in]``): the upcycling source."""

    up: Tensor  # [F, H]
    down: Tensor  # [H, F]
    gate: Tensor | None = None  # [F, H] (gated FFNs)
    up_bias: Tensor | None = None  # [F]
    gate_bias: Tensor | None = None  # [F]
    down_bias: Tensor | None = None  # [H]
    activation: str = "silu"  # a key of switchyard.activations.ACTIVATIONS

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
        if self.up.dim() != 2:
            raise ValueError(f"up must be [F, H], got shape {tuple(self.up.shape)}")
        f, h = self.up.shape
        expected = {"down": (h, f), "gate": (f, h), "up_bias": (f,), "gate_bias": (f,), "down_bias": (h,)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"DenseFFN.{name} must have shape {shape} (H={h}, F={f}), got {tuple(value.shape)}")
        if self.gate is None and self.gate_bias is not None:
            raise ValueError("DenseFFN has gate_bias but no gate")

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.up_bias, self.gate_bias, self.down_bias))

    @property
    def hidden_size(self) -> int:
        return int(self.up.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.up.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        """The reference math the experts reproduce: ``down(act(gate x) * up x)`` or ``down(act(up x))``."""
        act = get_activation(self.activation)
        h = F.linear(x, self.up, self.up_bias)
        h = act(F.linear(x, self.gate, self.gate_bias)) * h if self.gate is not None else act(h)
        return F.linear(h, self.down, self.down_bias)

    __call__ = forward


@dataclass(frozen=True)
class FFNSite:
    """Where one FFN lives: ``setattr(parent, attribute, moe)`` swaps it (OPT: see ``OPTAdapter``)."""

    layer_index: int
    qualified_name: str  # as in model.named_modules(), e.g. "model.layers.3.mlp"
    parent: nn.Module  # the decoder layer
    attribute: str  # e.g. "mlp"


# dtypes whose stored values are the weights themselves (int8/uint8/float8 storage needs scales to mean anything)
_REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PEFT_ADVICE = ("patch the transformers model first and add adapters afterwards (patch_model, then "
                "peft.get_peft_model), or merge them into the weights first (merge_and_unload())")


def refuse_peft_model(model: nn.Module) -> None:
    """A model carrying peft adapters (a ``PeftModel``, or transformers' ``load_adapter``) saves only its adapters,
    so MoE layers patched into it would not be saved; its module names also carry peft's ``base_model.model.``."""
    if getattr(model, "peft_config", None) or getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError(f"{type(model).__name__} carries peft adapters: {_PEFT_ADVICE}")


def refuse_offloaded(module: nn.Module, where: str) -> None:
    """accelerate's offloading (``device_map`` with "cpu"/"disk", ``cpu_offload``) leaves meta parameters behind
    hooks that load the real ones only inside a forward: read now they are shapes, and MoE layers built from them
    would run on uninitialized memory. (A meta model without such hooks is fine: only shapes are wanted there.)"""
    if any(hasattr(m, "_hf_hook") for m in module.modules()) and any(p.is_meta for p in module.parameters()):
        raise ValueError(f"{where}'s weights are offloaded by accelerate (meta parameters loaded only during "
                         "forward): load it without offloading (a device_map whose devices hold every weight, or "
                         "none), patch it, then dispatch it")


def refuse_unreadable(module: nn.Module, where: str) -> None:
    """Refuse weights that would be read wrong, before any is read: a peft adapter layer (its ``weight`` is the
    base weight alone, the adapter would be dropped), ZeRO-3 partitions (empty local shards) and quantized
    storage (int8/uint8/float8 values without their scales)."""
    for name, sub in module.named_modules():
        if isinstance(getattr(sub, "base_layer", None), nn.Module):
            raise ValueError(f"{'.'.join(filter(None, (where, name)))} is a peft adapter layer ({type(sub).__name__}); "
                             f"reading it would drop the adapter: {_PEFT_ADVICE}")
    for name, param in module.named_parameters():
        if hasattr(param, "ds_shape"):
            raise ValueError(
                f"{where}.{name} is partitioned by DeepSpeed ZeRO-3 (this rank holds {tuple(param.shape)} of "
                f"{tuple(param.ds_shape)}): switchyard's MoE layers run under ZeRO stages 0-2; build or load the model "
                "without ZeRO-3 (no deepspeed.zero.Init, no stage-3 DeepSpeed config active during from_pretrained)"
            )
        if param.dtype not in _REAL_DTYPES:
            raise ValueError(f"{where}.{name} is stored as {param.dtype} (a quantized model?): the MoE layers copy "
                             "real-valued weights; load the model without quantization_config (e.g. in bfloat16)")


def _linear(module: nn.Module, name: str, adapter: str, conv1d: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(weight [out, in], bias)`` of ``module.<name>``, detached; GPT-2's Conv1D stores ``[in, out]``."""
    sub = getattr(module, name, None)
    if isinstance(sub, nn.Module):
        refuse_unreadable(sub, f"{type(module).__name__}.{name}")
    weight = getattr(sub, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(
            f"{type(module).__name__} has no 2-D {name}.weight; the {adapter!r} adapter reads "
            f"modules laid out like its family (see switchyard.hf.architectures.ADAPTERS)"
        )
    weight = weight.detach()
    bias = getattr(sub, "bias", None)
    return (weight.t() if conv1d else weight), (bias.detach() if bias is not None else None)


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _dropout_p(module: nn.Module) -> float:
    """Largest dropout probability applied inside ``module`` (nn.Dropout children or float attributes)."""
    ps = [m.p for m in module.modules() if isinstance(m, nn.Dropout)]
    ps += [v for k, v in vars(module).items() if "dropout" in k and isinstance(v, float)]
    return max(ps, default=0.0)


_warned_dropout: set[tuple[str, str]] = set()


@dataclass(frozen=True, eq=False)
class FFNAdapter:
    """Base adapter: the FFN is the module ``<layer>.<attribute>``; subclasses say how to read it."""

    name: str
    model_types: tuple[str, ...]
    layer_paths: tuple[str, ...]  # tried in order: causal-LM wrapper first, then the bare base model
    attribute: str = "mlp"
    activation_attr: str = "hidden_act"
    activation_attr_by_type: Mapping[str, str] = field(default_factory=dict)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self._layers(model)[1])

    def _layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        for path in self.layer_paths:
            found = _resolve(model, path)
            if isinstance(found, nn.ModuleList):
                return path, found
        raise ValueError(
            f"{type(model).__name__} has none of the decoder-layer lists {list(self.layer_paths)} that the "
            f"{self.name!r} adapter looks for"
        )

    def sites(self, model: nn.Module) -> list[FFNSite]:
        path, layers = self._layers(model)
        return [FFNSite(i, f"{path}.{i}.{self.attribute}", layer, self.attribute) for i, layer in enumerate(layers)]

    def ffn_module(self, site: FFNSite) -> nn.Module:
        return getattr(site.parent, site.attribute)

    def activation(self, config: Any) -> str:
        attr = self.activation_attr_by_type.get(getattr(config, "model_type", ""), self.activation_attr)
        name = getattr(config, attr, None)
        if not isinstance(name, str):
            raise ValueError(
                f"{type(config).__name__}.{attr} = {name!r}: the {self.name!r} adapter needs an activation name"
            )
        return name

    def read(self, site: FFNSite, config: Any) -> DenseFFN:
        return self.read_module(self.ffn_module(site), self.activation(config))

    def read_module(self, module: nn.Module, activation: str) -> DenseFFN:
        raise NotImplementedError

    def install(self, site: FFNSite, moe: nn.Module) -> None:
        self._warn_lost_dropout(self.ffn_module(site))
        setattr(site.parent, site.attribute, moe)

    def _warn_lost_dropout(self, module: nn.Module) -> None:
        """GPT-2-style MLPs apply resid dropout inside the module; the MoE replacing them does not."""
        p, key = _dropout_p(module), (self.name, type(module).__name__)
        if p > 0 and key not in _warned_dropout:
            _warned_dropout.add(key)
            log.warning(f"{type(module).__name__} applies dropout(p={p}) to its output; the MoE layer replacing it "
                        "does not (eval outputs are identical, training differs)", ranks=[0])


@dataclass(frozen=True, eq=False)
class GatedFFNAdapter(FFNAdapter):
    """``down(act(gate(x)) * up(x))`` with three nn.Linear (biases optional, e.g. Llama's ``mlp_bias``)."""

    gate_name: str = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"

    def read_module(self, module: nn.Module, activation: str) -> DenseFFN:
        gate, gate_b = _linear(module, self.gate_name, self.name)
        up, up_b = _linear(module, self.up_name, self.name)
        down, down_b = _linear(module, self.down_name, self.name)
        return DenseFFN(up, down, gate, up_b, gate_b, down_b, activation)


@dataclass(frozen=True, eq=False)
class FusedGateUpAdapter(FFNAdapter):
    """Phi-3 / GLM: one ``gate_up_proj`` [2F, H]; ``gate, up = out.chunk(2, -1)`` → gate rows first."""

    gate_up_name: str = "gate_up_proj"
    down_name: str = "down_proj"

    def read_module(self, module: nn.Module, activation: str) -> DenseFFN:
        gate_up, gate_up_b = _linear(module, self.gate_up_name, self.name)
        if gate_up.shape[0] % 2:
            raise ValueError(f"{type(module).__name__}.{self.gate_up_name} has an odd row count {gate_up.shape[0]}")
        gate, up = gate_up.chunk(2, dim=0)
        gate_b, up_b = gate_up_b.chunk(2) if gate_up_b is not None else (None, None)
        down, down_b = _linear(module, self.down_name, self.name)
        return DenseFFN(up, down, gate, up_b, gate_b, down_b, activation)


@dataclass(frozen=True, eq=False)
class PlainFFNAdapter(FFNAdapter):
    """``down(act(up(x)))``; ``conv1d`` for GPT-2's Conv1D, whose weight is ``[in, out]``."""

    up_name: str = "up_proj"
    down_name: str = "down_proj"
    conv1d: bool = False

    def read_module(self, module: nn.Module, activation: str) -> DenseFFN:
        up, up_b = _linear(module, self.up_name, self.name, self.conv1d)
        down, down_b = _linear(module, self.down_name, self.name, self.conv1d)
        return DenseFFN(up, down, None, up_b, None, down_b, activation)


@dataclass(frozen=True, eq=False)
class OPTAdapter(PlainFFNAdapter):
    """OPT keeps ``fc1``/``fc2``/``activation_fn`` on the decoder layer itself and calls them inline.

    ``OPTDecoderLayer.forward`` (transformers 5.x) does::

        x = hidden.reshape(-1, H); residual = x; x = final_layer_norm(x)   # if do_layer_norm_before
        x = fc2(activation_fn(fc1(x)))
        x = dropout(x, p=self.dropout, training); x = (residual + x).view(shape)

    so ``install`` sets ``fc1 = moe`` and ``activation_fn = fc2 = Identity``: ``fc2(act(fc1(x)))``
    becomes ``moe(x)`` exactly, and the dropout after fc2 and the residual stay the layer's own, as in
    the dense model. The MoE sees 2-D ``[B*S, H]`` (fine: it takes any ``[..., H]``); the patched model's
    ``[B, S]`` attention mask splits it into B sequences for the per-sequence balance loss (called without a
    mask, the batch is one sequence). A site's ``qualified_name`` is
    the decoder layer (the FFN has no module of its own) and its ``attribute`` is ``"fc1"``, where the
    MoE ends up (state-dict keys ``….layers.3.fc1.router.weight``).
    """

    attribute: str = "fc1"

    def sites(self, model: nn.Module) -> list[FFNSite]:
        path, layers = self._layers(model)
        return [FFNSite(i, f"{path}.{i}", layer, self.attribute) for i, layer in enumerate(layers)]

    def ffn_module(self, site: FFNSite) -> nn.Module:
        # Registry sites point at (layer, "fc1"); a site matched by name may name the layer itself.
        return site.parent if site.attribute == self.up_name else getattr(site.parent, site.attribute)

    def read_module(self, module: nn.Module, activation: str) -> DenseFFN:
        # checked here, while planning: ``install`` failing on a later layer would leave the model half-patched
        if not hasattr(module, "activation_fn"):
            raise ValueError(f"{type(module).__name__} has no 'activation_fn'; it is not laid out like OPTDecoderLayer")
        return super().read_module(module, activation)

    def install(self, site: FFNSite, moe: nn.Module) -> None:
        layer = self.ffn_module(site)
        setattr(layer, self.up_name, moe)
        setattr(layer, "activation_fn", nn.Identity())
        setattr(layer, self.down_name, nn.Identity())


# Decoder layers of the causal-LM wrapper (``model.model.layers``), then of the bare base model.
_MODEL_LAYERS = ("model.layers", "layers")
_GPT_LAYERS = ("transformer.h", "h")

ADAPTERS: dict[str, FFNAdapter] = {a.name: a for a in (
    GatedFFNAdapter(
        "llama",
        ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "vaultgemma",
         "olmo", "olmo2", "olmo3", "granite", "cohere", "cohere2", "stablelm", "helium", "smollm3",
         "exaone4", "diffllama", "hunyuan_v1_dense", "ernie4_5"),
        _MODEL_LAYERS,
        # Gemma 2/3 and VaultGemma MLPs read ``hidden_activation``; everyone else ``hidden_act``.
        activation_attr_by_type={t: "hidden_activation" for t in ("gemma2", "gemma3_text", "vaultgemma")},
    ),
    FusedGateUpAdapter("phi3", ("phi3", "glm", "glm4"), _MODEL_LAYERS),
    PlainFFNAdapter("gpt2", ("gpt2",), _GPT_LAYERS, activation_attr="activation_function",
                    up_name="c_fc", down_name="c_proj", conv1d=True),
    PlainFFNAdapter("gpt_neox", ("gpt_neox",), ("gpt_neox.layers", "layers"),
                    up_name="dense_h_to_4h", down_name="dense_4h_to_h"),
    OPTAdapter("opt", ("opt",), ("model.decoder.layers", "decoder.layers", "layers"),
               activation_attr="activation_function", up_name="fc1", down_name="fc2"),
    PlainFFNAdapter("phi", ("phi",), _MODEL_LAYERS, up_name="fc1", down_name="fc2"),
    PlainFFNAdapter("starcoder2", ("starcoder2",), _MODEL_LAYERS, up_name="c_fc", down_name="c_proj"),
    PlainFFNAdapter("gptj", ("gptj",), _GPT_LAYERS, activation_attr="activation_function",
                    up_name="fc_in", down_name="fc_out"),
)}

_BY_MODEL_TYPE: dict[str, FFNAdapter] = {}
for _adapter in ADAPTERS.values():
    for _model_type in _adapter.model_types:
        assert _model_type not in _BY_MODEL_TYPE, f"model_type {_model_type!r} is claimed by two adapters"
        _BY_MODEL_TYPE[_model_type] = _adapter


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for(model: nn.Module) -> FFNAdapter:
    """The adapter for ``model.config.model_type``, or a ValueError saying how to target modules by hand."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"no dense-FFN adapter for model_type {model_type!r} ({type(model).__name__}); supported model types: "
        f"{supported_model_types()}. For another model whose FFN looks like one of the adapters "
        f"{sorted(ADAPTERS)}, target modules by name with patch_model(..., targets=[...], adapter='llama')"
    )


def read_generic(module: nn.Module, adapter_name: str, activation: str) -> DenseFFN:
    """Read a user-named module (outside the registry) with ``adapter_name``'s weight naming.

    For ``adapter_name='opt'`` the module is the layer holding ``fc1``/``fc2``.
    """
    if adapter_name not in ADAPTERS:
        raise ValueError(f"adapter {adapter_name!r} is unknown; choose one of {sorted(ADAPTERS)}")
    return ADAPTERS[adapter_name].read_module(module, activation)

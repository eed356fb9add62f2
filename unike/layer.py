"""One edited decoder layer as one module: its latent memory, neurons, spaces and negative pools, and the
hooks that put them into the layer's forward pass.

While attached, the memory and the neurons are also submodules of the decoder block (`unike_memory`,
`unike_neurons`), so nnsight traces reach them by name. Four hooks: the block's input x (pre-attention
state) is recorded, the attention output is shifted toward the retrieved knowledge (Eq. 2/7), the FFN input
q is recorded, and the neurons' output joins the FFN output (Eq. 3/6); with `latent_read="heads"` the
attention heads read the knowledge instead of the output shift (`unike.reading`). The first edited layer
decides where every layer's memory acts (`Switch.decision`). `Edits` holds every layer and the router: its
parameters and buffers are the editor's whole state.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from .config import UniKEConfig
from .hooks import Hooks
from .locate import Layer
from .memory import Decision, LatentMemory
from .neurons import NeuronPatch
from .prompting import device_of
from .reading import install, read_heads, uninstall
from .router import EditRouter
from .spaces import Spaces, zeta_variant


@dataclass
class Switch:
    """What the hooks of one editor share: its config, whether UniKE acts, and what the first edited layer
    decided in the current forward pass: the router's gate g_e and where the memory acts."""

    config: UniKEConfig
    enabled: bool = True
    gate: Bool[Tensor, "b t e"] | None = None
    pending: Bool[Tensor, "b t"] | None = None      # the gate of the edit being trained (for its memory entry)
    decision: Decision | None = None
    held: dict | None = None    # while an edit trains: what the first edited layer computed in the last call
    repeat: bool = False        # this forward repeats that call (`Scope.hold`)


def first(value):
    return value[0] if isinstance(value, tuple) else value


def follow(module: nn.Module, h: Tensor) -> nn.Module:
    """unike's modules compute in fp32 on the device of the activation they touch (and return its dtype):
    move one there the first time it differs, e.g. a layer placed by accelerate's `device_map`, or a
    `model.to(...)` after attaching that moved or cast it."""
    buffer = next(module.buffers())
    if buffer.device != h.device or buffer.dtype != torch.float32:
        module.to(h.device, torch.float32)
    return module


def _replace_output(output, h: Tensor):
    return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


class EditedLayer(nn.Module):
    """Layer `index`'s spaces, memory and neurons, and the FFN inputs its edits' neurons are trained against
    (kept on the CPU): those of fit questions, inside fit answers, at fit prompts' image tokens, and of
    earlier edits' targets."""

    def __init__(self, index: int, dim: int, switch: Switch, decides: bool = False):
        super().__init__()
        self.index, self.switch, config = index, switch, switch.config
        self.decides = decides              # the first edited layer: decides where every layer's memory acts
        self.spaces = Spaces(dim, config.encoder_hidden, config.truth_dim)
        self.memory = LatentMemory(dim, self.spaces, config.top_k, config.temperature, config.alpha,
                                   config.index_rank)
        self.neurons = NeuronPatch(dim, config.n_neurons, config.neuron_act, config.beta)
        self.register_buffer("negatives", torch.zeros(0, dim))          # fit questions' FFN inputs
        self.register_buffer("answer_negatives", torch.zeros(0, dim))   # ... inside fit answers
        self.register_buffer("prompt_negatives", torch.zeros(0, dim))   # ... at fit prompts' image tokens
        self.register_buffer("edited", torch.zeros(0, dim))             # earlier edits' target positions
        self.x: Tensor | None = None        # the block's input in the current forward
        self.q: Tensor | None = None        # the FFN's input
        self.captured: list | None = None   # set by `Collector.attn_values`: the heads' keys and values of h_pos
        self.reads_heads = False            # the attention module calls `_read` (`unike.reading`)

    @torch.no_grad()
    def fit(self, st: dict[str, Tensor], picks: tuple[Tensor, Tensor], gen: torch.Generator,
            device: torch.device) -> None:
        """The memory, its relevance gate, the negative pools and ζ′ from this layer's fit states
        (`FitStates.layers[l]`; spaces trained). `picks`: the fit questions and the answer positions kept
        as negatives, the same rows at every layer; `gen` draws a random ζ′."""
        cfg = self.switch.config
        self.spaces.to(device)
        self.memory.truncate(0)
        heads = (st["k_head"], st["v_head"]) if self.reads_heads and "k_head" in st else None
        if self.reads_heads and (heads is None or not heads[0].shape[1]):
            warnings.warn("these states were collected without the attention heads' keys and values (by an editor "
                          "with latent_read='shift'): the memory is read by the output shift; collect them with "
                          "this editor to read it by the heads", stacklevel=4)
        self.memory.add(st["h_sem"], st["h_pos"], st["v_pos"], fitted=True, heads=heads)
        self.memory.calibrate(st["h_sem"], st["other"], cfg.relevance_quantile)
        self.memory.scale_alpha(st["h_sem"].to(device), st["h_pos"].to(device))
        self.negatives, self.answer_negatives = st["q"][picks[0]], st["q_ans"][picks[1]]
        # a generator of its own, so the other draws are the same with or without the option
        picks = torch.randperm(len(st["q_other"]), generator=torch.Generator().manual_seed(cfg.seed + self.index))
        self.prompt_negatives = st["q_other"][picks[:cfg.prompt_negatives]]
        kind = cfg.zeta if cfg.collaboration else "none"
        self.neurons.truth = zeta_variant(self.spaces, kind, st["h_pos"], st["h_neg"], gen).to(device)

    def reset(self) -> None:
        """Drop every edit: its neurons, its memory entries, its inputs kept as negatives."""
        self.neurons.clear()
        self.edited = self.edited[:0]
        self.memory.truncate(int(self.memory.n_fit))

    def attach(self, layer: Layer, hooks: Hooks, extra: dict[str, nn.Module]) -> None:
        """Add the memory, the neurons and `extra` to layer's block as `unike_*` submodules, and the hooks."""
        dev = device_of(layer.block)      # not its weights' device: offloaded weights wait on "meta"
        for name, mod in self.named_parts(extra):
            if hasattr(layer.block, name):
                raise RuntimeError(f"layer {self.index} already carries {name}: another UniKE editor is "
                                   "attached; detach it first")
            layer.block.add_module(name, mod.to(dev))
        hooks.pre(layer.block, self._record_x, with_kwargs=True)
        hooks.forward(layer.attn, self._shift)
        if self.switch.config.latent_read == "heads":
            self.reads_heads = install(layer.attn, self._read)
            if not self.reads_heads:
                warnings.warn(f"layer {self.index}'s attention ({type(layer.attn).__name__}) does not take its "
                              "attention function from transformers' AttentionInterface: its latent knowledge "
                              "is read by the output shift (latent_read='shift')", stacklevel=4)
        hooks.pre(layer.mlp_in, self._record_q, with_kwargs=True)
        hooks.forward(layer.mlp, self._add_neurons)

    def release(self, layer: Layer) -> None:
        """Undo `attach`'s change to the attention module (its hooks go with `Hooks.remove`)."""
        uninstall(layer.attn)
        self.reads_heads, self.x, self.q = False, None, None

    def named_parts(self, extra: dict[str, nn.Module]) -> tuple[tuple[str, nn.Module], ...]:
        return (("unike_memory", self.memory), ("unike_neurons", self.neurons), *extra.items())

    def _record_x(self, module, args, kwargs):
        self.x = args[0] if args else kwargs["hidden_states"]
        if self.decides:
            self.switch.decision = None

    def _record_q(self, module, args, kwargs):
        self.q = args[0] if args else next(iter(kwargs.values()))

    def _acts(self) -> bool:
        return self.switch.enabled and self.switch.config.latent and len(self.memory) > 0

    def _heads(self) -> bool:
        """Whether the memory is read by the attention heads (`latent_read="heads"`, and they can)."""
        return (self.switch.config.latent_read == "heads" and self.reads_heads
                and self.memory.head_keys.shape[1] > 0)

    @contextlib.contextmanager
    def _deciding(self, memory: LatentMemory, x: Tensor):
        """Around one memory pass over x: the first edited layer first decides where every layer's memory
        acts (on states no edit has moved), and after it, α with it; a deeper layer reuses that decision
        (or decides for itself where this forward has none for its tokens)."""
        flat, decision = x.reshape(-1, x.shape[-1]), self.switch.decision
        if self.decides or decision is None or len(decision.relevant) != len(flat):
            gate, pending = (self.switch.gate, self.switch.pending) if self.decides else (None, None)
            decision = memory.decide(memory.unit(flat), None if gate is None else gate.reshape(-1, gate.shape[-1]),
                                     None if pending is None else pending.reshape(-1),
                                     fitted=self.switch.config.fitted_knowledge)
        yield decision
        if self.decides:
            self.switch.decision = decision._replace(alpha=memory.last_alpha)

    def _hold(self, part: str) -> dict | None:
        """While an edit trains, the first edited layer's `part` (shift, committed neurons) as the last call
        computed it, or an empty dict to keep this call's in; None otherwise. Its steps repeat one call whose
        input here no edit moves (`Scope.hold`), so what the committed edits do here is the same at each step:
        an exact speed-up, like `unike.replay` for what runs before."""
        held = self.switch.held
        return None if held is None or not self.decides else held.setdefault(part, {})

    def _shift(self, module, args, output):
        if not self._acts() or self._heads():
            return None
        h = first(output)
        x = self.x.to(h.device)        # the block's input may arrive from another device (device_map)
        if x.shape != h.shape:
            return None                # e.g. cross-attention layers whose output is not per input token
        held = self._hold("shift")
        if held:
            self.switch.decision = held["decision"]
            return _replace_output(output, held["shifted"])
        memory = follow(self.memory, h)
        with self._deciding(memory, x) as decision:
            shifted = memory(h, x, decision)
        if held is not None and not shifted.requires_grad:
            held.update(shifted=shifted, decision=self.switch.decision)
        return _replace_output(output, shifted)

    def _read(self, query: Tensor, key: Tensor, value: Tensor, out: Tensor, scaling: float) -> Tensor:
        """Called by the attention function with the heads' query [b, h, t, e], key and value [b, g, s, e]
        and output [b, t, h, e]: keeps the key and value at position 0 for `Collector.attn_values`, or mixes
        each head's attention over the retrieved entries into its output (`unike.reading`)."""
        if self.captured is not None:
            self.captured.append((key[:, :, 0].flatten(1).float(), value[:, :, 0].flatten(1).float()))
            return out
        if not (self._acts() and self._heads()):
            return out
        b, t, h, e = out.shape
        x = self.x.to(out.device)
        if x.shape[:2] != (b, t):
            return out
        memory = follow(self.memory, out)
        with self._deciding(memory, x) as decision:
            r = memory.select(x.reshape(-1, x.shape[-1]), decision)
        if not len(r.rows):
            return out
        g = key.shape[1]
        q = query.transpose(1, 2).reshape(b * t, h, e)[r.rows].float()
        m, k = r.idx.shape
        know = read_heads(q, memory.head_keys[r.idx].view(m, k, g, e), memory.head_values[r.idx].view(m, k, g, e),
                          r.use, scaling)
        flat = out.reshape(b * t, h, e).float()
        a = r.alpha[r.rows][:, None, None]
        mixed = flat.index_copy(0, r.rows, (1 - a) * flat[r.rows] + a * know)
        return mixed.reshape(out.shape).to(out.dtype)

    def _add_neurons(self, module, args, output):
        patch, gate = self.neurons, self.switch.gate
        if not (self.switch.enabled and self.switch.config.intrinsic) or (not patch.edits and patch.pending is None):
            return None
        out = first(output)
        if gate is not None and gate.shape[-1] != patch.edits:
            raise RuntimeError(f"the router holds {gate.shape[-1]} edits but layer {self.index} has {patch.edits}: "
                               "neurons were added without editor.edit(); add them through it (or route=False)")
        neurons = follow(patch, out)(self.q.to(out.device), gate, self._hold("neurons"))
        return _replace_output(output, out + neurons.reshape(out.shape))


class Edits(nn.Module):
    """Every edited layer (`layers["3"]`, ...) and the router of the first: the editor's whole state is
    this module's parameters and buffers."""

    def __init__(self, layer_ids: list[int], dim: int, config: UniKEConfig):
        super().__init__()
        self.switch = Switch(config)
        self.layers = nn.ModuleDict({str(l): EditedLayer(l, dim, self.switch, l == min(layer_ids)) for l in layer_ids})
        self.router = EditRouter(dim, config.route_question, config.route_image, config.route_image_max)

    def state(self) -> dict[str, Tensor]:
        """Every parameter and buffer by name (each once: the memory shares its layer's spaces)."""
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    @torch.no_grad()
    def put(self, name: str, value: Tensor) -> None:
        """Set one named tensor: a parameter in place, a buffer replaced (buffers change size with edits),
        cast to fp32 (floating point) on the device the buffer is on."""
        owner, _, leaf = name.rpartition(".")
        module = self.get_submodule(owner)
        old = getattr(module, leaf)
        value = value.to(old.device, torch.float32 if value.is_floating_point() else value.dtype)
        if isinstance(old, nn.Parameter):
            old.copy_(value)
        else:
            setattr(module, leaf, value)

    @contextlib.contextmanager
    def transaction(self, spaces: bool):
        """Restore every tensor if the block raises. Fit and edit replace buffers rather than write into
        them, so references are kept; what is written in place (0-d counters, and the spaces when
        `spaces`) is copied."""
        kept = {n: t.clone() if t.dim() == 0 or (spaces and ".spaces." in n) else t for n, t in self.state().items()}
        try:
            yield
        except BaseException:
            for layer in self.layers.values():
                layer.neurons.discard()
            for name, value in kept.items():
                self.put(name, value)
            raise

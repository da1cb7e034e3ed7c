"""An explicit, hookable decoder-only transformer for interpretability experiments.

Every experiment in this project runs on :class:`Transformer`, a short re-implementation of the
two decoder families the studies need:

* ``gpt2``  — LayerNorm, learned positions, fused multi-head attention, GELU MLP (GPT-2, GPT2-XL);
* ``llama`` — RMSNorm, rotary positions, grouped-query attention, gated (SwiGLU) MLP
  (SmolLM2, Llama, Qwen2 — the latter with q/k/v biases).

The weights are read from a Hugging Face checkpoint (:func:`Transformer.from_hf`, or
:func:`Transformer.from_checkpoint_dir` straight from the saved files); a test checks
that the logits match the Hugging Face implementation. Owning the forward pass gives what the
patching and path-patching code needs and a hook API alone does not:

* **per-head inputs** — each head's query/key/value input can be overridden separately, also
  on grouped-query models where key/value projections are shared by several query heads;
* **partial recomputation** — a run can start from a cached residual stream at any layer;
* **logits only where read** — the unembedding is applied only at requested positions.

Hook points follow TransformerLens names (``blocks.{l}.attn.hook_z`` …) so that the two can be
compared one to one. A hook is a function ``f(tensor) -> tensor | None`` registered by name in
``hooks``; a returned tensor replaces the activation. ``cache`` collects activations by name.

Shapes: ``b`` batch, ``p`` positions, ``h`` query heads, ``g`` key/value heads, ``d`` d_model,
``e`` d_head, ``f`` MLP hidden width, ``v`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

Hook = Callable[[Tensor], "Tensor | None"]

CONTROL_KEY = "mechrepro_label_control"  # the key of :class:`LabelControl` in a checkpoint's config.json


def rotary_inv_freq(d_head: int, theta: float = 10000.0) -> Tensor:
    """The rotary frequencies as transformers' default rotary embedding computes them (float32, integer steps)."""
    steps = torch.arange(0, d_head, 2, dtype=torch.int64).to(device="cpu", dtype=torch.float)
    return 1.0 / (float(theta) ** (steps / d_head))


@dataclass(frozen=True)
class LabelControl:
    """An architectural control of a multiple-choice prompt: no position before the answer line
    attends to a label token (other than itself), so a label's letter exists only at the label
    until the answer line reads it.

    A *label token* is a token of ``label_ids`` right after a token of ``newline_ids``; the
    *answer line* is every position after the last token of ``newline_ids`` of the row (padding
    is not a newline). Part of the model: a checkpoint carries it in its ``config.json``
    (:data:`CONTROL_KEY`), so the analyses run the model that was trained.
    """

    newline_ids: tuple[int, ...]
    label_ids: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"rule": "positions before the answer line cannot attend to label tokens",
                "newline_ids": list(self.newline_ids), "label_ids": list(self.label_ids)}

    @classmethod
    def from_dict(cls, d: dict | None) -> LabelControl | None:
        return None if not d else cls(tuple(int(i) for i in d["newline_ids"]), tuple(int(i) for i in d["label_ids"]))

    def allowed(self, tokens: Tensor) -> Tensor:
        """``[b, 1, p, p]``: False where query ``q`` (before the answer line) may not see key ``k`` (a label)."""
        nl = torch.isin(tokens, torch.tensor(self.newline_ids, device=tokens.device))
        after_nl = torch.zeros_like(nl)
        after_nl[:, 1:] = nl[:, :-1]
        is_label = torch.isin(tokens, torch.tensor(self.label_ids, device=tokens.device)) & after_nl  # [b, p]
        before_answer = nl.flip(-1).cumsum(-1).flip(-1) > 0  # a newline at or after q
        p = tokens.shape[1]
        not_self = ~torch.eye(p, dtype=torch.bool, device=tokens.device)
        blocked = before_answer[:, :, None] & is_label[:, None, :] & not_self  # [b, q, k]
        return ~blocked[:, None]


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters of a :class:`Transformer`."""

    arch: str  # "gpt2" | "llama"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    norm_eps: float
    n_positions: int = 0  # learned positions (gpt2 only)
    qkv_bias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class Transformer(nn.Module):
    """A decoder-only transformer with TransformerLens-style hook points.

    Parameters are stored per layer as plain tensors in "head" layout:
    ``W_Q[l]: [h, d, e]``, ``W_K[l], W_V[l]: [g, d, e]``, ``W_O[l]: [h, e, d]``,
    ``W_in[l]: [d, f]`` (and ``W_gate[l]`` for gated MLPs), ``W_out[l]: [f, d]``, ``W_U: [d, v]``.
    """

    def __init__(self, spec: ModelSpec, params: Mapping[str, Tensor], inv_freq: Tensor | None = None,
                 control: LabelControl | None = None):
        super().__init__()
        self.spec = spec
        self.control = control  # an architectural attention control (:class:`LabelControl`), or None
        for name, value in params.items():
            self.register_buffer("w__" + name.replace(".", "__"), value.float().contiguous(), persistent=True)
        if inv_freq is not None:
            self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.eval()

    # ---------------------------------------------------------------- parameters
    def p(self, name: str) -> Tensor:
        """The parameter tensor called ``name`` (e.g. ``"blocks.3.W_Q"``)."""
        return getattr(self, "w__" + name.replace(".", "__"))

    def trainable(self) -> list[Tensor]:
        """Make every parameter a leaf that requires grad (the forward pass reads them directly), and
        return them: the model trained by Study C's organism runs this same forward pass."""
        params = [b for name, b in self.named_buffers() if name.startswith("w__")]
        for t in params:
            t.requires_grad_(True)
        return params

    def has(self, name: str) -> bool:
        return hasattr(self, "w__" + name.replace(".", "__"))

    @property
    def W_U(self) -> Tensor:
        return self.p("W_U")

    def W_O(self, layer: int) -> Tensor:
        return self.p(f"blocks.{layer}.W_O")

    def kv_group(self, head: int) -> int:
        """Index of the key/value head that query head ``head`` reads (grouped-query attention)."""
        return head // (self.spec.n_heads // self.spec.n_kv_heads)

    # ---------------------------------------------------------------- building blocks
    def norm(self, x: Tensor, prefix: str) -> Tensor:
        """LayerNorm (gpt2) or RMSNorm (llama) with the weights stored under ``prefix``."""
        w = self.p(f"{prefix}.w")
        if self.spec.arch == "gpt2":
            mu = x.mean(-1, keepdim=True)
            var = (x - mu).pow(2).mean(-1, keepdim=True)
            return (x - mu) * torch.rsqrt(var + self.spec.norm_eps) * w + self.p(f"{prefix}.b")
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps) * w

    def final_norm(self, x: Tensor) -> Tensor:
        return self.norm(x, "ln_final")

    def unembed(self, resid: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Logits of the final residual ``resid [..., d]``; only for ``tokens`` when given."""
        normed = self.final_norm(resid)
        if tokens is None:
            return normed @ self.W_U
        return normed @ self.W_U[:, tokens]

    def _rotary(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate ``x [b, p, n, e]`` by the rotary angles of positions ``pos [b or 1, p]``."""
        freqs = pos.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, :, None, :], emb.sin()[:, :, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _project(self, x: Tensor, layer: int, kind: str, per_head: bool) -> Tensor:
        """Query/key/value projection. ``x`` is ``[b, p, d]`` or, if ``per_head``, ``[b, p, n, d]``."""
        W = self.p(f"blocks.{layer}.W_{kind}")  # [n, d, e]
        out = torch.einsum("bpnd,nde->bpne", x, W) if per_head else torch.einsum("bpd,nde->bpne", x, W)
        bias = f"blocks.{layer}.b_{kind}"
        return out + self.p(bias) if self.has(bias) else out

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        tokens: Tensor,
        *,
        hooks: Mapping[str, Hook] | None = None,
        cache: dict[str, Tensor] | None = None,
        cache_names: Iterable[str] | None = None,
        logits_at: Tensor | None = None,
        logit_tokens: Tensor | None = None,
        start_layer: int = 0,
        start_resid: Tensor | None = None,
        stop_layer: int | None = None,
        positions: Tensor | None = None,
        past: Mapping[int, tuple[Tensor, Tensor]] | None = None,
        past_len: Tensor | None = None,
    ) -> Tensor | None:
        """Run the model.

        Args:
            tokens: ``[b, p]`` token ids (right-padded batches are fine: attention is causal).
            hooks: name -> function applied to that activation; a returned tensor replaces it.
                Per-head input hooks ``blocks.{l}.attn.hook_{q,k,v}_input`` receive ``[b, p, h, d]``
                (one copy of the normalised-to-be residual per *query* head) and switch that
                layer to per-head projections.
            cache: dict that receives activations, restricted to ``cache_names`` if given.
            logits_at: ``[b]`` position per batch row; logits are computed only there
                (``[b, v]``). ``None``: logits at every position (``[b, p, v]``).
            logit_tokens: restrict the vocabulary of the returned logits to these ids.
            start_layer, start_resid: start from a cached ``blocks.{start_layer}.hook_resid_pre``.
            stop_layer: stop before this layer and return ``None`` (activations are in ``cache``).
            positions: ``[b, s]`` absolute positions of the given tokens (default ``0..s-1``).
            past: layer -> cached ``(keys, values)`` ``[b, P, g, e]`` of earlier positions (keys
                after rotary), e.g. ``hook_rot_k``/``hook_k`` and ``hook_v`` of a clean run. The
                given tokens then attend to ``past`` (the first ``past_len[b]`` entries of each
                row) and causally to each other: a suffix is recomputed without its prefix.

        A model with a :class:`LabelControl` needs ``tokens`` for a full pass; a resumed pass
        (``past``) recomputes answer-line positions (END), which the control does not restrict.
        """
        hooks = hooks or {}
        names = None if cache_names is None else set(cache_names)
        spec = self.spec
        ref = tokens if tokens is not None else start_resid
        b, n_pos = ref.shape[:2]
        pos = positions if positions is not None else torch.arange(n_pos, device=ref.device)[None]

        def hook(name: str, x: Tensor) -> Tensor:
            fn = hooks.get(name)
            if fn is not None:
                out = fn(x)
                if out is not None:
                    x = out
            if cache is not None and (names is None or name in names):
                cache[name] = x
            return x

        if start_layer == 0 and start_resid is None:
            x = self.p("W_E")[tokens]
            if spec.arch == "gpt2":
                x = x + self.p("W_pos")[pos]
        else:
            assert start_resid is not None, "start_layer > 0 needs start_resid"
            x = start_resid
        last = spec.n_layers if stop_layer is None else stop_layer
        mask = self._mask(pos, b, past_len, past[start_layer][0].shape[1] if past else 0)
        if self.control is not None and past is None:
            if tokens is None:
                raise ValueError("this model has a label-attention control: a pass over whole prompts needs their "
                                 "tokens (start_resid without tokens or past is not supported)")
            mask = mask & self.control.allowed(tokens)
        for layer in range(start_layer, last):
            x = self._block(layer, x, pos, hook, hooks, mask, None if past is None else past[layer])
        if stop_layer is not None:
            return None
        x = hook("ln_final.hook_in", x)
        if logits_at is not None:
            x = x[torch.arange(b, device=x.device), logits_at]
        return self.unembed(x, logit_tokens)

    @staticmethod
    def _mask(pos: Tensor, b: int, past_len: Tensor | None, n_past: int) -> Tensor:
        """Attention mask ``[b or 1, 1, s, P + s]``: causal within the tokens, prefix up to past_len."""
        s = pos.shape[-1]
        causal = torch.ones(s, s, dtype=torch.bool, device=pos.device).tril()
        if n_past == 0:
            return causal[None, None]
        valid = torch.arange(n_past, device=pos.device)[None, :] < past_len[:, None]  # [b, P]
        prefix = valid[:, None, None, :].expand(b, 1, s, n_past)
        return torch.cat([prefix, causal[None, None].expand(b, 1, s, s)], dim=-1)

    def _block(self, layer: int, x: Tensor, pos: Tensor, hook, hooks: Mapping[str, Hook], mask: Tensor,
               past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        spec = self.spec
        pre = f"blocks.{layer}"
        x = hook(f"{pre}.hook_resid_pre", x)
        normed = self.norm(x, f"{pre}.ln1")
        qkv = {}
        for kind in ("q", "k", "v"):
            name = f"{pre}.attn.hook_{kind}_input"
            if name in hooks:
                # Per-head inputs: the residual seen by each *query* head, normalised per head.
                per_head = x[:, :, None, :].expand(-1, -1, spec.n_heads, -1).clone()
                per_head = hook(name, per_head)
                h_in = self.norm(per_head, f"{pre}.ln1")
                if kind == "q":
                    qkv[kind] = self._project(h_in, layer, "Q", per_head=True)
                else:
                    # each query head projects its own input with its group's key/value weights
                    W = self.p(f"{pre}.W_{kind.upper()}")
                    idx = torch.tensor([self.kv_group(h) for h in range(spec.n_heads)], device=x.device)
                    out = torch.einsum("bpnd,nde->bpne", h_in, W[idx])
                    bias = f"{pre}.b_{kind.upper()}"
                    qkv[kind] = out + self.p(bias)[idx] if self.has(bias) else out
            else:
                qkv[kind] = self._project(normed, layer, kind.upper(), per_head=False)
        q = hook(f"{pre}.attn.hook_q", qkv["q"])
        k = hook(f"{pre}.attn.hook_k", qkv["k"])
        v = hook(f"{pre}.attn.hook_v", qkv["v"])
        if spec.arch == "llama":
            q = hook(f"{pre}.attn.hook_rot_q", self._rotary(q, pos))
            k = hook(f"{pre}.attn.hook_rot_k", self._rotary(k, pos))
        rep = spec.n_heads // spec.n_kv_heads
        if past is not None:  # keys/values of the cached prefix come first
            pk, pv = past
            if k.shape[2] != pk.shape[2]:
                pk, pv = pk.repeat_interleave(rep, dim=2), pv.repeat_interleave(rep, dim=2)
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
        if k.shape[2] != spec.n_heads:
            k = k.repeat_interleave(rep, dim=2)
        if v.shape[2] != spec.n_heads:
            v = v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(spec.d_head)
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = hook(f"{pre}.attn.hook_attn_scores", scores)
        pattern = hook(f"{pre}.attn.hook_pattern", scores.softmax(-1))
        z = hook(f"{pre}.attn.hook_z", torch.einsum("bhqk,bkhe->bqhe", pattern, v))
        attn_out = torch.einsum("bqhe,hed->bqd", z, self.p(f"{pre}.W_O"))
        if self.has(f"{pre}.b_O"):
            attn_out = attn_out + self.p(f"{pre}.b_O")
        attn_out = hook(f"{pre}.hook_attn_out", attn_out)
        x = hook(f"{pre}.hook_resid_mid", x + attn_out)
        mlp_out = hook(f"{pre}.hook_mlp_out", self.mlp(layer, x, hook))
        return hook(f"{pre}.hook_resid_post", x + mlp_out)

    def mlp(self, layer: int, resid_mid: Tensor, hook=None) -> Tensor:
        """The MLP block's output (its norm included) for the residual stream after attention
        ``resid_mid [..., d]`` of ``layer``; ``hook(name, x)`` sees ``blocks.{layer}.mlp.hook_post``."""
        pre = f"blocks.{layer}"
        normed = self.norm(resid_mid, f"{pre}.ln2")
        if self.spec.arch == "gpt2":
            pre_act = normed @ self.p(f"{pre}.W_in") + self.p(f"{pre}.b_in")
            post = nn.functional.gelu(pre_act, approximate="tanh")
        else:
            post = nn.functional.silu(normed @ self.p(f"{pre}.W_gate")) * (normed @ self.p(f"{pre}.W_in"))
        if hook is not None:
            post = hook(f"{pre}.mlp.hook_post", post)
        out = post @ self.p(f"{pre}.W_out")
        if self.has(f"{pre}.b_out"):
            out = out + self.p(f"{pre}.b_out")
        return out

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> Transformer:
        """Build from a loaded Hugging Face ``GPT2LMHeadModel`` or Llama/Qwen2-style causal LM."""
        cfg = hf_model.config
        sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
        mtype = cfg.model_type
        if mtype == "gpt2":
            return cls._from_gpt2(cfg, sd)
        if mtype in ("llama", "qwen2", "mistral"):
            inv_freq = hf_model.model.rotary_emb.inv_freq.detach().float()
            scaling = float(getattr(hf_model.model.rotary_emb, "attention_scaling", 1.0))
            if scaling != 1.0:
                raise NotImplementedError(f"rotary attention scaling {scaling} is not supported")
            return cls._from_llama(cfg, sd, inv_freq, LabelControl.from_dict(getattr(cfg, CONTROL_KEY, None)))
        raise NotImplementedError(
            f"model_type '{mtype}' is not supported; supported: gpt2, llama, qwen2, mistral"
        )

    @classmethod
    def from_checkpoint_dir(cls, model_dir) -> Transformer | None:
        """Build straight from a saved Hugging Face checkpoint (``config.json`` + one
        ``model.safetensors``), without importing the ``transformers`` modelling code.

        That import costs about 4 s in every process on the 2-core machine, more than most smoke
        jobs compute. The parameters are the ones :meth:`from_hf` reads from the loaded model, bit
        for bit (a test checks it). Returns ``None`` where this path does not apply (another
        architecture, rotary scaling, a sharded or untied checkpoint without its unembedding); the
        caller then loads through ``transformers``.
        """
        import json
        from pathlib import Path
        from types import SimpleNamespace

        from safetensors.torch import load_file

        d = Path(model_dir)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            return None
        raw = json.loads((d / "config.json").read_text())
        mtype = raw.get("model_type")
        if mtype == "gpt2":
            cfg = SimpleNamespace(**{"n_inner": None, "layer_norm_epsilon": 1e-5, "n_positions": 1024, **raw})
        elif mtype in ("llama", "qwen2", "mistral"):
            cfg = SimpleNamespace(**{"num_key_value_heads": None, "head_dim": None, "rms_norm_eps": 1e-6, **raw})
        else:
            return None
        sd = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
        if mtype == "gpt2":
            if "transformer.wte.weight" not in sd:
                return None
            return cls._from_gpt2(cfg, sd)
        if "lm_head.weight" not in sd and not raw.get("tie_word_embeddings", False):
            return None
        rope = raw.get("rope_parameters") or {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0),
                                               **(raw.get("rope_scaling") or {})}
        if rope.get("rope_type", rope.get("type", "default")) != "default" or raw.get("partial_rotary_factor", 1.0) != 1.0:
            return None
        e = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        return cls._from_llama(cfg, sd, rotary_inv_freq(e, rope["rope_theta"]), LabelControl.from_dict(raw.get(CONTROL_KEY)))

    @classmethod
    def _from_gpt2(cls, cfg, sd: dict[str, Tensor]) -> Transformer:
        d, H = cfg.n_embd, cfg.n_head
        e = d // H
        spec = ModelSpec("gpt2", cfg.n_layer, H, H, d, e, cfg.n_inner or 4 * d, cfg.vocab_size,
                         cfg.layer_norm_epsilon, cfg.n_positions, qkv_bias=True)
        p: dict[str, Tensor] = {"W_E": sd["transformer.wte.weight"], "W_pos": sd["transformer.wpe.weight"]}
        for l in range(cfg.n_layer):
            s = f"transformer.h.{l}."
            W = sd[s + "attn.c_attn.weight"]  # [d, 3d], used as x @ W
            bias = sd[s + "attn.c_attn.bias"]
            for i, kind in enumerate("QKV"):
                p[f"blocks.{l}.W_{kind}"] = W[:, i * d:(i + 1) * d].reshape(d, H, e).permute(1, 0, 2)
                p[f"blocks.{l}.b_{kind}"] = bias[i * d:(i + 1) * d].reshape(H, e)
            p[f"blocks.{l}.W_O"] = sd[s + "attn.c_proj.weight"].reshape(H, e, d)
            p[f"blocks.{l}.b_O"] = sd[s + "attn.c_proj.bias"]
            p[f"blocks.{l}.ln1.w"], p[f"blocks.{l}.ln1.b"] = sd[s + "ln_1.weight"], sd[s + "ln_1.bias"]
            p[f"blocks.{l}.ln2.w"], p[f"blocks.{l}.ln2.b"] = sd[s + "ln_2.weight"], sd[s + "ln_2.bias"]
            p[f"blocks.{l}.W_in"], p[f"blocks.{l}.b_in"] = sd[s + "mlp.c_fc.weight"], sd[s + "mlp.c_fc.bias"]
            p[f"blocks.{l}.W_out"], p[f"blocks.{l}.b_out"] = sd[s + "mlp.c_proj.weight"], sd[s + "mlp.c_proj.bias"]
        p["ln_final.w"], p["ln_final.b"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
        p["W_U"] = sd.get("lm_head.weight", sd["transformer.wte.weight"]).T
        return cls(spec, p)

    @classmethod
    def _from_llama(cls, cfg, sd: dict[str, Tensor], inv_freq: Tensor, control: LabelControl | None = None
                    ) -> Transformer:
        d, H = cfg.hidden_size, cfg.num_attention_heads
        G = getattr(cfg, "num_key_value_heads", None) or H
        e = getattr(cfg, "head_dim", None) or d // H
        has_bias = "model.layers.0.self_attn.q_proj.bias" in sd
        unsupported = [k for k in sd if k.endswith(("o_proj.bias", "gate_proj.bias", "up_proj.bias", "down_proj.bias"))]
        if unsupported:
            raise NotImplementedError(f"output/MLP biases are not supported (found {unsupported[0]})")
        spec = ModelSpec("llama", cfg.num_hidden_layers, H, G, d, e, cfg.intermediate_size,
                         cfg.vocab_size, cfg.rms_norm_eps, qkv_bias=has_bias)
        p: dict[str, Tensor] = {"W_E": sd["model.embed_tokens.weight"]}
        for l in range(cfg.num_hidden_layers):
            s = f"model.layers.{l}."
            for kind, n in (("Q", H), ("K", G), ("V", G)):
                W = sd[s + f"self_attn.{kind.lower()}_proj.weight"]  # [n*e, d], used as x @ W.T
                p[f"blocks.{l}.W_{kind}"] = W.reshape(n, e, d).permute(0, 2, 1)
                bname = s + f"self_attn.{kind.lower()}_proj.bias"
                if bname in sd:
                    p[f"blocks.{l}.b_{kind}"] = sd[bname].reshape(n, e)
            p[f"blocks.{l}.W_O"] = sd[s + "self_attn.o_proj.weight"].T.reshape(H, e, d)
            p[f"blocks.{l}.ln1.w"] = sd[s + "input_layernorm.weight"]
            p[f"blocks.{l}.ln2.w"] = sd[s + "post_attention_layernorm.weight"]
            p[f"blocks.{l}.W_gate"] = sd[s + "mlp.gate_proj.weight"].T
            p[f"blocks.{l}.W_in"] = sd[s + "mlp.up_proj.weight"].T
            p[f"blocks.{l}.W_out"] = sd[s + "mlp.down_proj.weight"].T
        p["ln_final.w"] = sd["model.norm.weight"]
        p["W_U"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T
        return cls(spec, p, inv_freq, control)

"""A Llama-family model with LoRA adapters, forward and backward, in plain numpy.

The core of edgelora's on-device trainer: no torch at run time. It computes exactly what
transformers' LlamaForCausalLM + PEFT LoRA compute in float32 (checked in tests/test_train.py),
and the gradient of the masked next-token loss with respect to the LoRA parameters only.

Shape key (after llm.c):
    B  batch                    T  sequence length          BT = B*T rows
    C  hidden width             F  MLP width                V  vocabulary
    H  query heads              KV key/value heads          G  = H // KV (query heads per KV head)
    D  head dim (H*D = C)       R  LoRA rank                N  number of loss positions

Layout decisions:
- Base weights: a dict of arrays in Hugging Face orientation (a linear W is out x in), canonical
  names "embed", "norm", "lm_head" (absent when tied), "layers.{i}.{attn_norm,q,k,v,o,mlp_norm,gate,up,down}".
  They are frozen: nothing here ever writes to them.
- LoRA: one flat buffer; "layers.{i}.{kind}.A" (R x in) and ".B" (out x R) are views into it,
  and the gradient is a flat buffer of the same layout, so an optimizer step is one vector update.
- Memory (`keep=`): what the forward pass keeps of each trainable layer for the backward pass.
  Sizes per layer per 256 tokens on SmolLM2-135M (C=576, F=1536), step CPU time at T=256:
    "input":   only the layer's input (0.6 MB); the backward pass reruns the whole layer first:
               least memory, one more forward pass of work (~1.3x the step time of "matmuls");
    "matmuls": (default) the outputs of the big matmuls (q, k, v, attention output, gate, up),
               the residual stream and x A^T (6.0 MB); norms, softmax probabilities and SwiGLU
               are recomputed in the backward pass (elementwise work plus one q k^T per layer);
    "all":     everything (12.4 MB, probabilities grow as T^2): a few % faster than "matmuls".
  Layers below the trainable ones keep nothing. Kept arrays are copied into a Workspace that a
  training loop reuses from step to step (fresh pages cost ~5-10% of a step in page faults).
- Attention is causal by blocks of query time steps (`attn_block`): the score blocks wholly
  above the diagonal are never computed.
- The LM head is evaluated only at the loss positions, in row chunks, with its softmax and its
  backward fused per chunk, so the (BT x V) logits never exist. The embedding / LM head may be a
  table kept in quantized blocks (`BlockRows`): the lookup gathers rows, the head multiplies by
  one expanded range of vocabulary rows at a time.
- Dtype follows the inputs: float32 in use, float64 for finite-difference tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelora.arch import ModelConfig
from edgelora.errors import EdgeloraError
from edgelora.naming import LORA_TARGETS
from edgelora.rope import layer_tables

LORA_KINDS: tuple[str, ...] = LORA_TARGETS


class TrainerError(EdgeloraError):
    """Bad input to the trainer."""


@dataclass(frozen=True)
class LoraSpec:
    """Which linears carry an adapter, and its rank and alpha (scale = alpha / rank)."""
    rank: int
    alpha: float
    kinds: tuple[str, ...] = LORA_KINDS
    layers: tuple[int, ...] | None = None  # None: every layer

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in LORA_KINDS]
        if bad:
            raise TrainerError(f"unknown LoRA targets {bad}; choose from {LORA_KINDS}")
        if self.rank <= 0:
            raise TrainerError(f"LoRA rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraParams:
    """All LoRA parameters in one flat buffer with named views "layers.{i}.{kind}.A" / ".B"."""

    def __init__(self, config: ModelConfig, spec: LoraSpec, flat: np.ndarray | None = None,
                 dtype=np.float32):
        self.config, self.spec = config, spec
        layers = range(config.num_layers) if spec.layers is None else spec.layers
        self.layout: list[tuple[str, tuple[int, int], int]] = []  # (name, shape, offset)
        off = 0
        for i in layers:
            for kind in LORA_KINDS:  # canonical order, whatever order spec.kinds has
                if kind not in spec.kinds:
                    continue
                out_f, in_f = config.linear_shape(kind)
                for suffix, shape in (("A", (spec.rank, in_f)), ("B", (out_f, spec.rank))):
                    self.layout.append((f"layers.{i}.{kind}.{suffix}", shape, off))
                    off += shape[0] * shape[1]
        self.size = off
        if flat is None:
            flat = np.zeros(off, dtype)
        if flat.shape != (off,):
            raise TrainerError(f"flat LoRA buffer has shape {flat.shape}, expected ({off},)")
        self.flat = flat
        self.views: dict[str, np.ndarray] = self.views_of(flat)

    def views_of(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views into any buffer of this layout (the parameters, a gradient, Adam moments)."""
        return {name: flat[o:o + s[0] * s[1]].reshape(s) for name, s, o in self.layout}

    def pair(self, layer: int, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        a = self.views.get(f"layers.{layer}.{kind}.A")
        return None if a is None else (a, self.views[f"layers.{layer}.{kind}.B"])

    def like(self, flat: np.ndarray) -> "LoraParams":
        return LoraParams(self.config, self.spec, flat)

    def astype(self, dtype) -> "LoraParams":
        return LoraParams(self.config, self.spec, self.flat.astype(dtype))

    def init_random(self, rng: np.random.Generator) -> "LoraParams":
        """PEFT's default init: A kaiming-uniform(a=sqrt(5)) i.e. U(+-1/sqrt(in)), B zero."""
        for name, arr in self.views.items():
            if name.endswith(".A"):
                bound = 1.0 / math.sqrt(arr.shape[1])
                arr[...] = rng.uniform(-bound, bound, arr.shape)
            else:
                arr[...] = 0.0
        return self


# ----------------------------------------------------------------------------------------------
# ops: each forward next to its backward

# embedding: x = embed[tokens]. The embedding is frozen and the gradient stops at the first
# trainable layer's input, so there is no embedding backward.

def embedding_forward(embed, tokens, scale=None):
    # embed (V,C), tokens (B,T) int; Gemma multiplies by sqrt(C), rounded to the weights' dtype
    x = embed[tokens]                                        # (B,T,C)
    if scale is not None:
        x *= x.dtype.type(scale)
    return x


def rmsnorm_forward(x, w, eps):
    # x (N,C), w (C,)
    ms = np.einsum("nc,nc->n", x, x)[:, None] / x.shape[1]  # (N,1) mean of squares
    rstd = 1.0 / np.sqrt(ms + eps)                           # (N,1)
    xn = x * rstd                                            # (N,C)
    return xn * w, (xn, rstd)                                # (N,C)


def rmsnorm_backward(dout, w, cache):
    # dout (N,C), w (C,); y = w * x * rstd, d rstd/dx = -rstd^3 x / C
    xn, rstd = cache
    g = dout * w                                             # (N,C)
    proj = np.einsum("nc,nc->n", g, xn)[:, None] / xn.shape[1]  # (N,1) mean(g * xn)
    g -= xn * proj
    g *= rstd
    return g                                                 # (N,C) dx


def linear_forward(x, W, ab, scale, bias=None):
    # x (N,in), W (out,in), ab = (A (R,in), B (out,R)) or None, bias (out,) or None;
    # y = x W^T + bias + scale (x A^T) B^T. The bias is frozen: nothing in the backward pass.
    y = x @ W.T                                              # (N,out)
    if bias is not None:
        y += bias
    if ab is None:
        return y, None
    A, Bm = ab
    xa = x @ A.T                                             # (N,R)
    y += (xa * scale) @ Bm.T                                 # (N,out)
    return y, xa


def linear_backward(dy, x, xa, W, ab, scale, grads, add_to=None, need_dx=True):
    # dy (N,out), x (N,in), xa (N,R); grads = (dA (R,in), dB (out,R)) views of the flat gradient.
    # Fills dA = scale (dy B)^T x and dB = scale dy^T (x A^T); returns dx = dy W + scale (dy B) A
    # (N,in), added into add_to if given, or None if not need_dx.
    dyb = None
    if ab is not None:
        A, Bm = ab
        dA, dB = grads
        dyb = dy @ Bm                                        # (N,R)
        dyb *= scale
        np.matmul(dyb.T, x, out=dA)                          # (R,in)
        np.matmul(dy.T, xa, out=dB)                          # (out,R)
        dB *= scale
    if not need_dx:
        return None
    if add_to is None:
        dx = dy @ W                                          # (N,in)
    else:
        dx = add_to
        dx += dy @ W
    if dyb is not None:
        dx += dyb @ ab[0]
    return dx


def rope_forward(x, cos, sin):
    # x (B,T,h,D), cos/sin (T,Dr) with Dr <= D (Phi-4-mini rotates the first 3/4 of each head);
    # on the first Dr dims y = x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]; the rest pass
    dr = cos.shape[-1]
    h = dr // 2
    c, s = cos[:, None, :], sin[:, None, :]                  # (T,1,Dr)
    y = x.copy() if dr < x.shape[-1] else np.empty_like(x)   # (B,T,h,D)
    xr = x[..., :dr]
    np.multiply(xr, c, out=y[..., :dr])
    y[..., :h] -= xr[..., h:] * s[..., :h]
    y[..., h:dr] += xr[..., :h] * s[..., h:]
    return y


def rope_backward(dy, cos, sin):
    # the transpose of the rotation: dx = dy cos + rotate_half^T(dy sin), rotate_half^T(u) = [u2, -u1]
    dr = cos.shape[-1]
    h = dr // 2
    c, s = cos[:, None, :], sin[:, None, :]
    dx = dy.copy() if dr < dy.shape[-1] else np.empty_like(dy)  # (B,T,h,D)
    dyr = dy[..., :dr]
    np.multiply(dyr, c, out=dx[..., :dr])
    dx[..., :h] += dyr[..., h:] * s[..., h:]
    dx[..., h:dr] -= dyr[..., :h] * s[..., :h]
    return dx


def head_norm_forward(x, w, eps):
    # Qwen3 / Gemma 3 q and k norms: RMSNorm over each head. x (B,T,h,D), w (D,)
    shape = x.shape
    y, cache = rmsnorm_forward(x.reshape(-1, shape[-1]), w, eps)  # (BTh,D)
    return y.reshape(shape), cache


def head_norm_backward(dy, w, cache):
    return rmsnorm_backward(dy.reshape(-1, dy.shape[-1]), w, cache).reshape(dy.shape)


@dataclass(frozen=True)
class Causal:
    """Causal attention over query blocks of `block` time steps.

    Rows of one KV group are ordered t*G + g (time-major), so a block of time steps is a
    contiguous range of rows, and block j only needs the keys up to its own last step: the
    scores above the diagonal blocks are never computed (about half the work at T >> block).
    """
    T: int
    G: int
    block: int
    neg: np.ndarray  # (block*G, block) additive mask of a diagonal block: 0 or -inf
    window: int | None = None  # sliding-window layers: a query sees at most `window` keys, itself included
    scale: float | None = None  # scores scale (None: 1/sqrt(D); Gemma 3: query_pre_attn_scalar**-0.5)

    @classmethod
    def make(cls, T, G, block, dtype, window=None, scale=None):
        block = min(block, T)
        t_row = np.arange(block * G) // G                                         # (block*G,)
        neg = np.where(np.arange(block)[None, :] <= t_row[:, None], 0.0, -np.inf).astype(dtype)
        return cls(T, G, block, neg, window if window and window < T else None, scale)

    def spans(self):
        # (t0, t1, r0, r1): time steps [t0,t1) are rows [r0,r1) and see keys [0,t1)
        for t0 in range(0, self.T, self.block):
            t1 = min(self.T, t0 + self.block)
            yield t0, t1, t0 * self.G, t1 * self.G

    def window_mask(self, t0, t1, dtype):
        # (rows, t1) additive mask of the keys a sliding window hides from time steps [t0,t1)
        t_row = t0 + np.arange((t1 - t0) * self.G) // self.G                      # (rows,)
        return np.where(t_row[:, None] - np.arange(t1)[None, :] >= self.window, -np.inf, 0.0).astype(dtype)


def attention_probs(q, k, causal: Causal):
    # Grouped-query causal attention. Query head h = kv*G + g uses KV head kv (transformers'
    # repeat_kv), so the G query heads of one KV head are stacked as T*G rows of one matrix.
    # q (B,KV,T*G,D), k (B,KV,T,D) -> list of probability blocks (B,KV,r1-r0,t1), float32 softmax
    scale = causal.scale or 1.0 / math.sqrt(q.shape[-1])
    blocks = []
    for t0, t1, r0, r1 in causal.spans():
        att = q[:, :, r0:r1] @ k[:, :, :t1].transpose(0, 1, 3, 2)  # (B,KV,n,t1)
        att *= scale
        att[..., t0:] += causal.neg[:r1 - r0, :t1 - t0]
        if causal.window is not None:
            att += causal.window_mask(t0, t1, att.dtype)
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        blocks.append(att)
    return blocks


def attention_forward(q, k, v, causal: Causal):
    # q (B,KV,TG,D), k, v (B,KV,T,D) -> out (B,KV,TG,D), probability blocks
    p = attention_probs(q, k, causal)
    out = np.empty_like(q)                                   # (B,KV,TG,D)
    for (t0, t1, r0, r1), pb in zip(causal.spans(), p):
        np.matmul(pb, v[:, :, :t1], out=out[:, :, r0:r1])
    return out, p


def attention_backward(dout, q, k, v, p, causal: Causal):
    # dout (B,KV,TG,D), p the probability blocks -> dq (B,KV,TG,D), dk, dv (B,KV,T,D)
    scale = causal.scale or 1.0 / math.sqrt(q.shape[-1])
    dq = np.empty_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for (t0, t1, r0, r1), pb in zip(causal.spans(), p):
        do = dout[:, :, r0:r1]                               # (B,KV,n,D)
        dv[:, :, :t1] += pb.transpose(0, 1, 3, 2) @ do       # (B,KV,t1,D) summed over the G heads
        dp = do @ v[:, :, :t1].transpose(0, 1, 3, 2)         # (B,KV,n,t1)
        dp -= np.einsum("bkrt,bkrt->bkr", dp, pb)[..., None]  # softmax backward: p (dp - sum(dp p))
        dp *= pb
        dp *= scale                                          # dscores
        np.matmul(dp, k[:, :, :t1], out=dq[:, :, r0:r1])     # (B,KV,n,D)
        dk[:, :, :t1] += dp.transpose(0, 1, 3, 2) @ q[:, :, r0:r1]  # (B,KV,t1,D)
    return dq, dk, dv


def _sigmoid(x):
    s = np.negative(x)                                       # one buffer, four in-place passes
    with np.errstate(over="ignore"):                         # exp(88+) = inf -> sigmoid 0, as wanted
        np.exp(s, out=s)
    s += 1.0
    return np.reciprocal(s, out=s)


def swiglu_forward(g, u):
    # g, u (N,F); a = silu(g) * u, silu(g) = g sigmoid(g)
    s = _sigmoid(g)                                          # (N,F)
    a = g * s
    a *= u                                                   # (N,F)
    return a, s


def swiglu_backward(da, g, u, s):
    # d silu/dg = s (1 + g (1 - s))
    du = g * s
    du *= da                                                 # (N,F) da * silu(g)
    dg = 1.0 - s
    dg *= g
    dg += 1.0
    dg *= s
    dg *= da
    dg *= u                                                  # (N,F)
    return dg, du


_GELU_C = math.sqrt(2.0 / math.pi)


def geglu_forward(g, u):
    # g, u (N,F); a = gelu_tanh(g) * u, gelu_tanh(g) = g (1 + t) / 2, t = tanh(c (g + 0.044715 g^3))
    t = g * g
    t *= 0.044715
    t += 1.0
    t *= g
    t *= _GELU_C
    np.tanh(t, out=t)                                        # (N,F)
    a = t + 1.0
    a *= g
    a *= 0.5
    a *= u                                                   # (N,F)
    return a, t


def geglu_backward(da, g, u, t):
    # d gelu/dg = (1 + t) / 2 + g (1 - t^2) c (1 + 3 0.044715 g^2) / 2
    du = t + 1.0
    du *= g
    du *= 0.5
    du *= da                                                 # (N,F) da * gelu(g)
    dg = g * g
    dg *= 3 * 0.044715
    dg += 1.0
    dg *= _GELU_C
    dg *= g
    dg *= 1.0 - t * t
    dg += 1.0 + t
    dg *= 0.5
    dg *= da
    dg *= u                                                  # (N,F)
    return dg, du


ACTIVATIONS = {"silu": (swiglu_forward, swiglu_backward), "gelu_tanh": (geglu_forward, geglu_backward)}


def head_logits(h, W, out=None):
    # h (n,C), W (V,C) an array or a table kept in blocks (`chunks()`: row ranges expanded in turn);
    # out (n,V) or None -> h W^T
    if isinstance(W, np.ndarray):
        return np.matmul(h, W.T, out=out)
    out = np.empty((len(h), W.shape[0]), h.dtype) if out is None else out
    for s, e, w in W.chunks():
        out[:, s:e] = h @ w.T                                # (n,e-s)
    return out


def head_input_grad(d, W):
    # d (n,V), W (V,C) as in head_logits -> d W (n,C)
    if isinstance(W, np.ndarray):
        return d @ W
    dh = np.zeros((len(d), W.shape[1]), d.dtype)
    for s, e, w in W.chunks():
        dh += d[:, s:e] @ w                                  # (n,C)
    return dh


def lm_head_ce_forward(h, W, targets, out=None):
    # h (n,C) final-normed states at loss positions, W (V,C), targets (n,) int; out (n,V) or None
    logits = head_logits(h, W, out)                          # (n,V)
    rows = np.arange(len(targets))
    m = logits.max(axis=-1, keepdims=True)                   # (n,1)
    logits -= m
    z_t = logits[rows, targets].copy()                       # (n,) target logit (shifted)
    np.exp(logits, out=logits)
    s = logits.sum(axis=-1)                                  # (n,)
    loss_sum = float(np.sum(np.log(s) - z_t, dtype=np.float64))
    logits /= s[:, None]                                     # (n,V) probabilities
    return loss_sum, logits


def lm_head_ce_backward(probs, targets, W, inv_n):
    # loss = mean over all N positions of -log p[target]; dlogits = (p - onehot) / N
    probs[np.arange(len(targets)), targets] -= 1.0
    probs *= inv_n                                           # (n,V) dlogits, in place
    return head_input_grad(probs, W)                         # (n,C) dh


# ----------------------------------------------------------------------------------------------
# one transformer layer

def _layer_weights(base, i, cfg: ModelConfig):
    return {k: base[f"layers.{i}.{k}"] for k in cfg.spec.layer_tensors}


def layer_forward(x, base, lora, i, cfg: ModelConfig, rope, causal: Causal, B, T):
    # x (BT,C) -> out (BT,C), cache for layer_backward; rope = this layer's (cos, sin), causal its mask.
    # The family decides the optional steps: q/k/v biases, q/k head norms, norms after attention
    # and after the MLP (Gemma 3), the MLP's activation.
    w = _layer_weights(base, i, cfg)
    fam = cfg.spec
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // KV
    eps = cfg.rms_norm_eps
    sc = lora.spec.scale if lora is not None else 1.0
    ab = (lambda kind: lora.pair(i, kind)) if lora is not None else (lambda kind: None)
    cos, sin = rope
    c = {}  # everything layer_backward needs
    xn1, c["n1"] = rmsnorm_forward(x, w["attn_norm"], eps)     # (BT,C)
    c["xn1"] = xn1
    q, c["q_xa"] = linear_forward(xn1, w["q"], ab("q"), sc, w.get("q_bias"))  # (BT,H*D)
    k, c["k_xa"] = linear_forward(xn1, w["k"], ab("k"), sc, w.get("k_bias"))  # (BT,KV*D)
    v, c["v_xa"] = linear_forward(xn1, w["v"], ab("v"), sc, w.get("v_bias"))  # (BT,KV*D)
    q, k = q.reshape(B, T, H, D), k.reshape(B, T, KV, D)
    if fam.qk_norm:
        q, c["qn"] = head_norm_forward(q, w["q_norm"], eps)    # (B,T,H,D)
        k, c["kn"] = head_norm_forward(k, w["k_norm"], eps)    # (B,T,KV,D)
    q = rope_forward(q, cos, sin)                              # (B,T,H,D)
    k = rope_forward(k, cos, sin)                              # (B,T,KV,D)
    qh = np.ascontiguousarray(q.reshape(B, T, KV, G, D).transpose(0, 2, 1, 3, 4)).reshape(B, KV, T * G, D)
    kh = np.ascontiguousarray(k.transpose(0, 2, 1, 3))                      # (B,KV,T,D)
    vh = np.ascontiguousarray(v.reshape(B, T, KV, D).transpose(0, 2, 1, 3))  # (B,KV,T,D)
    c["qh"], c["kh"], c["vh"] = qh, kh, vh
    att, c["p"] = attention_forward(qh, kh, vh, causal)        # (B,KV,TG,D), rows t*G+g
    ao = np.ascontiguousarray(att.reshape(B, KV, T, G, D).transpose(0, 2, 1, 3, 4)).reshape(B * T, H * D)
    c["ao"] = ao
    o, c["o_xa"] = linear_forward(ao, w["o"], ab("o"), sc)     # (BT,C)
    if fam.sandwich_norms:
        o, c["pn1"] = rmsnorm_forward(o, w["post_attn_norm"], eps)  # (BT,C)
    o += x                                                      # (BT,C) residual 1
    c["h"] = h = o
    xn2, c["n2"] = rmsnorm_forward(h, w["mlp_norm"], eps)       # (BT,C)
    c["xn2"] = xn2
    c["g"], c["g_xa"] = linear_forward(xn2, w["gate"], ab("gate"), sc)  # (BT,F)
    c["u"], c["u_xa"] = linear_forward(xn2, w["up"], ab("up"), sc)      # (BT,F)
    c["a"], c["s"] = ACTIVATIONS[fam.activation][0](c["g"], c["u"])    # (BT,F)
    d, c["d_xa"] = linear_forward(c["a"], w["down"], ab("down"), sc)   # (BT,C)
    if fam.sandwich_norms:
        d, c["pn2"] = rmsnorm_forward(d, w["post_mlp_norm"], eps)       # (BT,C)
    d += h                                                              # (BT,C) residual 2
    return d, c


def layer_backward(dout, c, base, lora, grads: dict, i, cfg: ModelConfig, rope, causal: Causal, B, T,
                   need_dx=True):
    # dout (BT,C) gradient of the layer output -> dx (BT,C) (None if not need_dx); fills grads views
    w = _layer_weights(base, i, cfg)
    fam = cfg.spec
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // KV
    sc = lora.spec.scale
    cos, sin = rope

    def ab(kind):
        return lora.pair(i, kind)

    def gr(kind):
        a = grads.get(f"layers.{i}.{kind}.A")
        return None if a is None else (a, grads[f"layers.{i}.{kind}.B"])

    # MLP: d = [post_mlp_norm](down(act(gate(xn2)) * up(xn2))) + h
    dd = rmsnorm_backward(dout, w["post_mlp_norm"], c["pn2"]) if fam.sandwich_norms else dout  # (BT,C)
    da = linear_backward(dd, c["a"], c["d_xa"], w["down"], ab("down"), sc, gr("down"))  # (BT,F)
    dg, du = ACTIVATIONS[fam.activation][1](da, c["g"], c["u"], c["s"])      # (BT,F) each
    del da, dd
    dxn2 = linear_backward(dg, c["xn2"], c["g_xa"], w["gate"], ab("gate"), sc, gr("gate"))  # (BT,C)
    linear_backward(du, c["xn2"], c["u_xa"], w["up"], ab("up"), sc, gr("up"), add_to=dxn2)
    del dg, du
    dh = rmsnorm_backward(dxn2, w["mlp_norm"], c["n2"])                     # (BT,C)
    dh += dout                                                               # residual 2
    # attention: h = [post_attn_norm](o(attn(rope(qn(q(xn1))), rope(kn(k(xn1))), v(xn1)))) + x
    do = rmsnorm_backward(dh, w["post_attn_norm"], c["pn1"]) if fam.sandwich_norms else dh  # (BT,C)
    dao = linear_backward(do, c["ao"], c["o_xa"], w["o"], ab("o"), sc, gr("o"))  # (BT,H*D)
    del do
    datt = np.ascontiguousarray(dao.reshape(B, T, KV, G, D).transpose(0, 2, 1, 3, 4)).reshape(B, KV, T * G, D)
    dqh, dkh, dvh = attention_backward(datt, c["qh"], c["kh"], c["vh"], c["p"], causal)
    dq = dqh.reshape(B, KV, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)      # (B,T,H,D)
    dq = rope_backward(dq, cos, sin)                                                     # (B,T,H,D)
    dk = rope_backward(dkh.transpose(0, 2, 1, 3), cos, sin)                              # (B,T,KV,D)
    if fam.qk_norm:
        dq = head_norm_backward(dq, w["q_norm"], c["qn"])
        dk = head_norm_backward(dk, w["k_norm"], c["kn"])
    dq, dk = dq.reshape(B * T, H * D), dk.reshape(B * T, KV * D)
    dv = np.ascontiguousarray(dvh.transpose(0, 2, 1, 3)).reshape(B * T, KV * D)
    # the lowest trainable layer needs the LoRA gradients of q, k, v but no dx below them
    dxn1 = linear_backward(dq, c["xn1"], c["q_xa"], w["q"], ab("q"), sc, gr("q"), need_dx=need_dx)  # (BT,C)
    linear_backward(dk, c["xn1"], c["k_xa"], w["k"], ab("k"), sc, gr("k"), add_to=dxn1, need_dx=need_dx)
    linear_backward(dv, c["xn1"], c["v_xa"], w["v"], ab("v"), sc, gr("v"), add_to=dxn1, need_dx=need_dx)
    if not need_dx:
        return None
    dx = rmsnorm_backward(dxn1, w["attn_norm"], c["n1"])                    # (BT,C)
    dx += dh                                                                 # residual 1
    return dx


# ----------------------------------------------------------------------------------------------
# whole model

class Workspace:
    """Buffers that live across training steps (llm.c allocates its activations once; same idea).

    What the forward pass keeps for the backward pass is copied into slots allocated on the first
    step and reused after, and the LM head's logits chunk has a fixed buffer. Without this, every
    step takes its ~180 MB of kept activations from fresh pages (glibc gives freed memory back to
    the kernel): ~46K page faults per step on SmolLM2 at T=256, about 10% of the step time.
    Pass the same Workspace to every loss_and_grads call of a training run.
    """

    def __init__(self):
        self._slots: dict = {}

    def buffer(self, key, shape, dtype) -> np.ndarray:
        slot = self._slots.get(key)
        if slot is None or slot.shape != tuple(shape) or slot.dtype != dtype:
            slot = self._slots[key] = np.empty(shape, dtype)
        return slot

    def keep(self, key, value):
        """A copy of value (an array, or a tuple/list/dict of them) in this workspace's slots."""
        if isinstance(value, np.ndarray):
            out = self.buffer(key, value.shape, value.dtype)
            np.copyto(out, value)
            return out
        if isinstance(value, dict):
            return {k: self.keep((key, k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.keep((key, j), v) for j, v in enumerate(value))
        return value

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._slots.values())


KEEP_MODES = ("input", "matmuls", "all")
_RECOMPUTED = ("xn1", "n1", "xn2", "n2", "p", "a", "s")  # what "matmuls" drops and rebuilds


def _compact(cache, x):
    kept = {k: v for k, v in cache.items() if k not in _RECOMPUTED}
    kept["x"] = x
    return kept


def _restore(kept, base, i, cfg: ModelConfig, causal: Causal):
    # rebuild the cheap parts of a layer's cache from its kept matmul outputs
    c = dict(kept)
    c["xn1"], c["n1"] = rmsnorm_forward(kept["x"], base[f"layers.{i}.attn_norm"], cfg.rms_norm_eps)
    c["xn2"], c["n2"] = rmsnorm_forward(kept["h"], base[f"layers.{i}.mlp_norm"], cfg.rms_norm_eps)
    c["p"] = attention_probs(kept["qh"], kept["kh"], causal)
    c["a"], c["s"] = ACTIVATIONS[cfg.spec.activation][0](kept["g"], kept["u"])
    return c


def _check_inputs(base, tokens, loss_mask, cfg):
    if tokens.ndim != 2:
        raise TrainerError(f"tokens must be (B,T), got shape {tokens.shape}")
    if loss_mask is not None and loss_mask.shape != tokens.shape:
        raise TrainerError(f"loss_mask shape {loss_mask.shape} != tokens shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise TrainerError(f"token ids must be in [0, {cfg.vocab_size})")
    if not cfg.tie_word_embeddings and "lm_head" not in base:
        raise TrainerError("config says untied embeddings but base has no 'lm_head'")


def _head_weight(base, cfg):
    # a tied head stored apart (an ONNX graph's 6-bit head) is the one the device computes logits with
    return base["lm_head"] if not cfg.tie_word_embeddings or "lm_head" in base else base["embed"]


def _hidden(base, lora, tokens, config: ModelConfig, attn_block: int):
    """(B,T) tokens -> (BT,C) last layer's output, keeping nothing for a backward pass."""
    B, T = tokens.shape
    ropes, causals = _position_tables(config, T, attn_block, base["embed"].dtype)
    x = embedding_forward(base["embed"], tokens, _embed_scale(config)).reshape(B * T, -1)  # (BT,C)
    for i in range(config.num_layers):
        x, _ = layer_forward(x, base, lora, i, config, ropes[i], causals[i], B, T)
    return x


def forward_logits(base, lora, tokens, config: ModelConfig, *, attn_block: int = 64):
    """Inference check: (B,T) tokens -> (B,T,V) logits (lora may be None)."""
    _check_inputs(base, tokens, None, config)
    B, T = tokens.shape
    xn, _ = rmsnorm_forward(_hidden(base, lora, tokens, config, attn_block), base["norm"], config.rms_norm_eps)
    return head_logits(xn, _head_weight(base, config)).reshape(B, T, -1)     # (B,T,V)


def _loss_targets(tokens, loss_mask) -> tuple[np.ndarray, np.ndarray]:
    """The rows (b*T + t) that predict a marked token, and those tokens."""
    T = tokens.shape[1]
    sel_b, sel_t = np.nonzero(np.asarray(loss_mask, bool)[:, 1:])            # targets at t+1
    if len(sel_b) == 0:
        raise TrainerError("loss_mask selects no target tokens (loss_mask[:, 1:] is all False)")
    return sel_b * T + sel_t, tokens[sel_b, sel_t + 1]                       # (N,), (N,)


def _embed_scale(config: ModelConfig):
    return math.sqrt(config.hidden_size) if config.spec.embed_scale else None


def _position_tables(config: ModelConfig, T: int, attn_block: int, dtype):
    """Per layer, its RoPE (cos, sin) and its attention mask (sliding-window layers their own)."""
    G = config.num_heads // config.num_kv_heads
    scale = config.attn_scale if config.query_pre_attn_scalar is not None else None
    masks = {w: Causal.make(T, G, attn_block, dtype, w, scale) for w in {config.sliding_window, None}}
    causals = [masks[config.sliding_window if config.is_sliding(i) else None] for i in range(config.num_layers)]
    return layer_tables(config, T, dtype), causals


def _head_loss(x, base, config: ModelConfig, rows, targets, vocab_rows: int, ws: "Workspace", backward: bool):
    """Final norm and LM head at the loss rows only, in chunks of vocab_rows rows: the summed
    cross-entropy and, with backward, d(mean loss)/d(normed rows) and the norm's cache."""
    W = _head_weight(base, config)
    N = len(rows)
    hn, ncache = rmsnorm_forward(x[rows], base["norm"], config.rms_norm_eps)  # (N,C)
    dhn = np.empty_like(hn) if backward else None                            # (N,C)
    loss_sum = 0.0
    chunk = ws.buffer("logits", (min(N, vocab_rows), W.shape[0]), x.dtype)   # (rows,V)
    for s in range(0, N, vocab_rows):
        e = min(N, s + vocab_rows)
        ls, probs = lm_head_ce_forward(hn[s:e], W, targets[s:e], out=chunk[:e - s])  # probs is the chunk
        loss_sum += ls
        if backward:
            dhn[s:e] = lm_head_ce_backward(probs, targets[s:e], W, 1.0 / N)
    return loss_sum, dhn, ncache


def masked_loss(base, lora: LoraParams | None, tokens, loss_mask, config: ModelConfig, *, vocab_rows: int = 256,
                attn_block: int = 64, workspace: Workspace | None = None) -> float:
    """The loss of `loss_and_grads` without its backward pass (validation, scoring mixtures):
    the forward keeps nothing and the LM head computes no gradient."""
    _check_inputs(base, tokens, loss_mask, config)
    rows, targets = _loss_targets(tokens, loss_mask)
    x = _hidden(base, lora, tokens, config, attn_block)
    ws = Workspace() if workspace is None else workspace
    return _head_loss(x, base, config, rows, targets, vocab_rows, ws, backward=False)[0] / len(rows)


def loss_and_grads(base, lora: LoraParams, tokens, loss_mask, config: ModelConfig, *,
                   train_last: int | None = None, keep: str = "matmuls", vocab_rows: int = 256,
                   attn_block: int = 64, workspace: Workspace | None = None):
    """Masked next-token cross-entropy and its gradient with respect to every LoRA parameter.

    tokens (B,T) int; loss_mask (B,T) bool marks the tokens that are targets (like transformers'
    labels with -100 elsewhere: token t is predicted from position t-1, so loss_mask[:, 0] is
    ignored); loss = mean over the marked tokens. train_last=k: gradients flow only through the
    last k layers (the first L-k are run once, their LoRA still applied, their gradient zero).
    keep: "input" | "matmuls" | "all", what each trainable layer keeps for the backward pass (see
    the module docstring). vocab_rows: loss rows per LM-head chunk (the (rows x V) logits buffer).
    attn_block: time steps per causal query block in attention. workspace: buffers reused across
    calls (pass the same one at every step; saves the page faults of fresh memory).
    Returns (loss: float, grad: flat array in lora's layout).
    """
    _check_inputs(base, tokens, loss_mask, config)
    L = config.num_layers
    k = L if train_last is None else train_last
    if not 0 < k <= L:
        raise TrainerError(f"train_last must be in 1..{L}, got {train_last}")
    if keep not in KEEP_MODES:
        raise TrainerError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
    first = L - k
    B, T = tokens.shape
    C = config.hidden_size
    dtype = base["embed"].dtype
    rows, targets = _loss_targets(tokens, loss_mask)
    N = len(rows)
    ropes, causals = _position_tables(config, T, attn_block, dtype)
    ws = Workspace() if workspace is None else workspace

    # forward: nothing kept below `first`; layer inputs (or whole caches) kept above
    x = embedding_forward(base["embed"], tokens, _embed_scale(config)).reshape(B * T, C)  # (BT,C)
    saved = []
    for i in range(L):
        out, cache = layer_forward(x, base, lora, i, config, ropes[i], causals[i], B, T)
        if i >= first:
            kept = x if keep == "input" else _compact(cache, x) if keep == "matmuls" else cache
            saved.append(ws.keep(("layer", i), kept))
        del cache
        x = out

    # head: final norm and LM head only at the N loss rows, in chunks of vocab_rows rows
    loss_sum, dhn, ncache = _head_loss(x, base, config, rows, targets, vocab_rows, ws, backward=True)
    dsel = rmsnorm_backward(dhn, base["norm"], ncache)                       # (N,C)
    dx = np.zeros((B * T, C), dtype)                                         # (BT,C)
    dx[rows] = dsel                                                          # rows are distinct

    # backward through the trainable layers, rebuilding what each one did not keep
    grad = np.zeros(lora.size, lora.flat.dtype)
    gviews = lora.views_of(grad)
    for i in range(L - 1, first - 1, -1):
        item = saved.pop()
        if keep == "input":
            cache = layer_forward(item, base, lora, i, config, ropes[i], causals[i], B, T)[1]
        elif keep == "matmuls":
            cache = _restore(item, base, i, config, causals[i])
        else:
            cache = item
        dx = layer_backward(dx, cache, base, lora, gviews, i, config, ropes[i], causals[i], B, T, need_dx=i > first)
        del cache, item
    return loss_sum / N, grad


# ----------------------------------------------------------------------------------------------
# optimizer: one vector update over the flat buffer

@dataclass
class AdamW:
    """AdamW over a flat parameter buffer (torch.optim.AdamW's update, decoupled weight decay)."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    step_count: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        # params, grad (P,) float32; updates params in place
        if self.m is None:
            self.m, self.v = np.zeros_like(params), np.zeros_like(params)
        b1, b2 = self.betas
        self.step_count += 1
        params *= 1.0 - self.lr * self.weight_decay
        self.m *= b1
        self.m += (1.0 - b1) * grad
        self.v *= b2
        self.v += (1.0 - b2) * grad * grad
        denom = np.sqrt(self.v / (1.0 - b2 ** self.step_count)) + self.eps
        params -= (self.lr / (1.0 - b1 ** self.step_count)) * self.m / denom

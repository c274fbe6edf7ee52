"""Recurrent layers: RNN, GRU and LSTM with ONNX's gate orders, directions, activations, clip and sequence lengths."""
from __future__ import annotations

import torch

from .registry import register


def _activation(name: str, alpha, beta):
    name = name.lower()
    table = {
        "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
        "affine": lambda x: alpha * x + beta,
        "leakyrelu": lambda x: torch.where(x >= 0, x, alpha * x),
        "thresholdedrelu": lambda x: torch.where(x > alpha, x, torch.zeros_like(x)),
        "scaledtanh": lambda x: alpha * torch.tanh(beta * x),
        "hardsigmoid": lambda x: torch.clamp(alpha * x + beta, 0, 1),
        "elu": lambda x: torch.where(x >= 0, x, alpha * (torch.exp(x) - 1)),
        "softsign": lambda x: x / (1 + torch.abs(x)),
        "softplus": lambda x: torch.log1p(torch.exp(x)),
    }
    return table[name]


_DEFAULT_ALPHA = {"leakyrelu": 0.01, "thresholdedrelu": 1.0, "hardsigmoid": 0.2, "elu": 1.0, "affine": 1.0, "scaledtanh": 1.0}
_DEFAULT_BETA = {"hardsigmoid": 0.5, "affine": 0.0, "scaledtanh": 1.0}


def _activations(names, alphas, betas, defaults, directions):
    names = list(names) if names else defaults * directions
    alphas, betas = list(alphas or []), list(betas or [])
    result, a, b = [], 0, 0
    for name in names:
        key = name.lower()
        alpha = beta = None
        if key in _DEFAULT_ALPHA:
            alpha = alphas[a] if a < len(alphas) else _DEFAULT_ALPHA[key]
            a += 1
        if key in _DEFAULT_BETA:
            beta = betas[b] if b < len(betas) else _DEFAULT_BETA[key]
            b += 1
        result.append(_activation(key, alpha, beta))
    per = len(defaults)
    return [result[d * per:(d + 1) * per] for d in range(directions)]


def _run(kind, x, w, r, b, sequence_lens, initial_h, initial_c, p, *, activations, activation_alpha, activation_beta,
         clip, direction, hidden_size, layout, num_outputs, linear_before_reset=0, input_forget=0):
    if layout:
        x = x.transpose(0, 1)
    steps, batch, _ = x.shape
    directions = 2 if direction == "bidirectional" else 1
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    hidden = hidden_size or r.shape[-1]
    defaults = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}[kind]
    fns = _activations(activations, activation_alpha, activation_beta, defaults, directions)
    b = b if b is not None else torch.zeros(directions, 2 * gates * hidden, dtype=x.dtype)
    lengths = sequence_lens.to(torch.int64) if sequence_lens is not None else torch.full((batch,), steps)
    zeros = torch.zeros(directions, batch, hidden, dtype=x.dtype)
    h0 = initial_h if initial_h is not None else zeros
    c0 = initial_c if initial_c is not None else zeros
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = direction == "reverse" or d == 1
        wd, rd = w[d], r[d]
        wb, rb = b[d][: gates * hidden], b[d][gates * hidden:]
        h, c = h0[d], c0[d]
        f = fns[d]
        out = torch.zeros(steps, batch, hidden, dtype=x.dtype)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for t in order:
            # Reversed sequences start at each batch entry's own last step, so a step past its length is skipped.
            active = (t < lengths).reshape(batch, 1)
            xt = x[t]
            xw = xt @ wd.T + wb
            if kind == "RNN":
                pre = xw + h @ rd.T + rb
                new_h = f[0](pre.clamp(-clip, clip) if clip else pre)
                new_c = c
            elif kind == "GRU":
                xz, xr, xh = xw.chunk(3, -1)
                rz, rr, rh = rd.chunk(3, 0)
                bz, br, bh = rb.chunk(3, -1)
                cl = (lambda v: v.clamp(-clip, clip)) if clip else (lambda v: v)
                z = f[0](cl(xz + h @ rz.T + bz))
                rt = f[0](cl(xr + h @ rr.T + br))
                if linear_before_reset:
                    candidate = f[1](cl(xh + rt * (h @ rh.T + bh)))
                else:
                    candidate = f[1](cl(xh + (rt * h) @ rh.T + bh))
                new_h = (1 - z) * candidate + z * h
                new_c = c
            else:
                gi, go, gf, gc = (xw + h @ rd.T + rb).chunk(4, -1)
                pi, po, pf = p[d].chunk(3) if p is not None else (0, 0, 0)
                cl = (lambda v: v.clamp(-clip, clip)) if clip else (lambda v: v)
                i = f[0](cl(gi + pi * c))
                fg = f[0](cl(gf + pf * c))
                if input_forget:
                    fg = 1 - i
                candidate = f[1](cl(gc))
                new_c = fg * c + i * candidate
                o = f[0](cl(go + po * new_c))
                new_h = o * f[2](new_c)
            h = torch.where(active, new_h, h)
            c = torch.where(active, new_c, c)
            out[t] = torch.where(active, new_h, torch.zeros_like(new_h))
        ys.append(out)
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, 1)  # [steps, directions, batch, hidden]
    y_h, y_c = torch.stack(hs), torch.stack(cs)
    if layout:
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    results = (y, y_h, y_c) if kind == "LSTM" else (y, y_h)
    return results[:num_outputs] if num_outputs > 1 else results[0]


@register("RNN", since=14)
def rnn(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction="forward", hidden_size=None, layout=0, _num_outputs=1):
    return _run("RNN", x, w, r, b, sequence_lens, initial_h, None, None, activations=activations,
                activation_alpha=activation_alpha, activation_beta=activation_beta, clip=clip, direction=direction,
                hidden_size=hidden_size, layout=layout, num_outputs=_num_outputs)


@register("GRU", since=14)
def gru(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction="forward", hidden_size=None, layout=0, linear_before_reset=0,
        _num_outputs=1):
    return _run("GRU", x, w, r, b, sequence_lens, initial_h, None, None, activations=activations,
                activation_alpha=activation_alpha, activation_beta=activation_beta, clip=clip, direction=direction,
                hidden_size=hidden_size, layout=layout, num_outputs=_num_outputs, linear_before_reset=linear_before_reset)


@register("LSTM", since=14)
def lstm(x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *, activation_alpha=None,
         activation_beta=None, activations=None, clip=None, direction="forward", hidden_size=None, input_forget=0,
         layout=0, _num_outputs=1):
    return _run("LSTM", x, w, r, b, sequence_lens, initial_h, initial_c, p, activations=activations,
                activation_alpha=activation_alpha, activation_beta=activation_beta, clip=clip, direction=direction,
                hidden_size=hidden_size, layout=layout, num_outputs=_num_outputs, input_forget=input_forget)

"""The teacher's forward as every mode uses it: its last hidden states, the head applied to selected ones only
(with the architecture's own logit scaling, checked against the model's forward), log-probs of given tokens, a
refusal of NaN, and batches of rows within a token budget. Also the language model's config inside a multimodal
one.
"""

from __future__ import annotations

import torch

from ar2mdm.shared.errors import UserError


def hidden_states(model, input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> torch.Tensor:
    """(B, S, H) last hidden states of a causal LM; the default mask is causal."""
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state


def check_finite(t: torch.Tensor, where: str) -> None:
    """Refuse a teacher output holding NaN (its logits overflowed, e.g. a model trained in bf16 run in float16)."""
    if torch.isnan(t).any():
        raise UserError(
            f"the teacher's {where} came out NaN (its activations overflow in this --dtype); rerun with "
            "--dtype bfloat16 (or float32)"
        )


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 logits from (n, H) last hidden states, as the model's own forward computes them.

    topk and fim apply the head to selected hidden states only (B x V instead of B x S x V), so the
    architecture's logit scaling is applied here: Granite divides by ``logits_scaling``, Cohere multiplies by
    ``logit_scale``, Gemma soft-caps. `check_head_path` verifies this against the model's forward at load.
    """
    z = model.get_output_embeddings()(h).float()
    c = model.config
    if getattr(c, "logits_scaling", None):  # Granite
        z = z / c.logits_scaling
    if getattr(c, "logit_scale", None):  # Cohere
        z = z * c.logit_scale
    cap = getattr(c, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3
        z = torch.tanh(z / cap) * cap
    return z


@torch.no_grad()
def check_head_path(model) -> None:
    """Refuse a teacher whose logits `head_logits` does not reproduce (an unknown logit scaling), in one line."""
    dev = next(model.parameters()).device
    x = torch.arange(1, 9, device=dev)[None] % model.get_output_embeddings().weight.shape[0]
    ref = model(input_ids=x, use_cache=False).logits[0].float()  # (8, V)
    got = head_logits(model, hidden_states(model, x)[0])
    tol = 1e-3 + 2e-2 * (next(model.parameters()).dtype != torch.float32)
    if not torch.allclose(got, ref, atol=tol * max(1.0, float(ref.abs().max())), rtol=0):
        raise UserError(
            f"teacher {model.config.model_type}: its forward transforms the logits in a way ar2mdm does "
            "not reproduce (an unknown logit scaling); --mode topk/fim would be wrong with it"
        )


def log_softmax_head(model, h: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N, V) float32 log-probs from (N, H) hidden states (chunked: N x V logits are large)."""
    outs = [torch.log_softmax(head_logits(model, h[a : a + chunk]), dim=-1) for a in range(0, h.shape[0], chunk)]
    return (
        torch.cat(outs)
        if outs
        else h.new_zeros((0, model.get_output_embeddings().weight.shape[0]), dtype=torch.float32)
    )


def token_logliks(model, h: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N,) log p(targets[n]) under the head applied to h[n]; never holds more than chunk x V logits."""
    out = []
    for a in range(0, h.shape[0], chunk):
        z = head_logits(model, h[a : a + chunk])  # (n, V)
        # z[target] - logsumexp(z): no second (n, V) tensor as log_softmax would allocate
        out.append(z.gather(1, targets[a : a + chunk, None].long())[:, 0] - torch.logsumexp(z, dim=-1))
    return torch.cat(out) if out else h.new_zeros((0,), dtype=torch.float32)


@torch.no_grad()
def prefix_logprobs(model, input_ids: torch.Tensor, row: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """log p_T(. | x_<i) at positions ``pos`` (N,) of rows ``row`` (N,) of ``input_ids`` (B, L): (N, V) float32.

    Every position is >= 1 (the logits at i-1 predict x_i); row and pos on input_ids' device.
    """
    h = hidden_states(model, input_ids)  # (B, L, H)
    return log_softmax_head(model, h[row, pos - 1])


def budget_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (count x longest) fits the budget."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    batches, a = [], 0
    while a < len(order):
        b = a + 1
        while b < len(order) and (b + 1 - a) * lengths[order[b]] <= token_budget:
            b += 1
        batches.append(order[a:b])
        a = b
    return batches


def text_config(config):
    """The language model's config: a multimodal one (Gemma 3's) nests it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def vocab_size_of(config) -> int:
    return int(text_config(config).vocab_size)


@torch.no_grad()
def last_token_top(model, prompts: list[list[int]], top_n: int, token_budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-n of p_T(. | prompt) after each prompt: ids (Q, n) long and log-probs (Q, n) float32, on the host,
    n = min(top_n, V). Prompts of mixed lengths are batched within ``token_budget`` tokens, right-padded; the head
    runs at each prompt's last token only (B x V logits, not B x S x V: V is 152k for Qwen)."""
    dev = next(model.parameters()).device
    n = min(top_n, model.get_output_embeddings().weight.shape[0])
    out_ids = torch.zeros(len(prompts), n, dtype=torch.long)
    out_lp = torch.zeros(len(prompts), n)
    for idx in budget_batches([len(p) for p in prompts], token_budget):
        S = max(len(prompts[j]) for j in idx)
        ids = torch.zeros(len(idx), S, dtype=torch.long)
        att = torch.zeros(len(idx), S, dtype=torch.long)
        for r, j in enumerate(idx):
            ids[r, : len(prompts[j])] = torch.tensor(prompts[j])
            att[r, : len(prompts[j])] = 1
        h = hidden_states(model, ids.to(dev), attention_mask=att.to(dev))  # (B, S, H)
        lp = log_softmax_head(model, h[torch.arange(len(idx)), att.sum(1).to(dev) - 1])  # (B, V)
        v, i = lp.topk(n, dim=-1)
        check_finite(v, "fim log-probs")
        out_ids[idx], out_lp[idx] = i.cpu(), v.cpu()  # one copy per batch: a copy per prompt waited on the device
    return out_ids, out_lp

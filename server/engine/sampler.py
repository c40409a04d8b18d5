"""Batched multi-adapter sampling with a KV cache.

All rows of all requests decode together; each row may use a different adapter (or none).
Rows are grouped by adapter so LoRA routing is a few contiguous row spans. Prompts are
left-padded; positions come from the attention mask so padding does not shift them.

Logprobs returned for sampled tokens are those of the model's own distribution (temperature
1, no top-k / top-p), the same quantity `forward` and `compute_logprobs` report, so
importance ratios start at exactly 1 for an unchanged policy.

`sample_request_problem` is the one check of a sample request (prompt, vocabulary, context,
num_samples, max_tokens, top_p, temperature): the server runs it on each request as it
turns the wire args into a SampleRequest (`sample_request_from_args`), and `Engine.sample`
again on every request it is given, after what only the engine knows (adapter slots).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from .lora import LoRARouting, spans_for_rows
from .errors import EngineInputError
from .models import BaseModel


@dataclass
class SampleRequest:
    slot: Optional[int]
    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)


def sample_request_problem(req: SampleRequest, vocab_size: int, max_length: int) -> Optional[tuple[str, str]]:
    """(message, field) of the first thing wrong with a request for a model of `vocab_size`
    tokens and a context of `max_length`, else None. `field` is relative to the request
    (prompt, num_samples, sampling_params.<name>); prompt + max_tokens may fill the context."""
    prompt = req.prompt
    if not prompt:
        return "prompt is empty", "prompt"
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        return f"prompt token outside the vocabulary [0, {vocab_size})", "prompt"
    if req.num_samples < 1:
        return f"num_samples must be >= 1, got {req.num_samples}", "num_samples"
    room = max_length - len(prompt)
    if room < 1:
        return f"prompt of {len(prompt)} tokens leaves no room in the context of {max_length}", "prompt"
    if req.max_tokens < 1 or req.max_tokens > room:
        return (f"max_tokens must be in [1, {room}] for this prompt, got {req.max_tokens}",
                "sampling_params.max_tokens")
    if not 0.0 < req.top_p <= 1.0:
        return f"top_p must be in (0, 1], got {req.top_p}", "sampling_params.top_p"
    if req.temperature < 0:
        return "temperature must be >= 0", "sampling_params.temperature"
    return None


def sample_request_from_args(
    args: dict[str, Any], base: BaseModel, slot: Optional[int], seed_fallback: Callable[[], int],
) -> SampleRequest:
    """The SampleRequest of a sample op's wire args ({prompt, num_samples, sampling_params}),
    checked (`sample_request_problem`); raises EngineInputError (where = the args' field).

    max_tokens None: all the room the context leaves. stop: a string, a list of strings or
    a list of token ids; none keeps the model's end-of-sequence ids. seed None:
    `seed_fallback()`. `slot`: the adapter's (None: the base model)."""
    params = args.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise EngineInputError("sampling_params must be a map", "sampling_params")
    prompt = np.asarray(args["prompt"])
    if prompt.ndim != 1 or (prompt.size and prompt.dtype.kind not in "iu"):
        raise EngineInputError(f"prompt must be a 1-D list of integer token ids, got dtype {prompt.dtype} "
                               f"and shape {list(prompt.shape)}", "prompt")
    prompt = prompt.astype(np.int64).tolist()
    max_tokens = params.get("max_tokens")
    stop = params.get("stop")
    stop_ids, stop_strings = list(base.eos_token_ids), []
    if isinstance(stop, str):
        stop_strings = [stop]
    elif isinstance(stop, list) and stop:
        if all(isinstance(s, str) for s in stop):
            stop_strings = list(stop)
        elif all(isinstance(s, int) for s in stop):
            stop_ids = [int(s) for s in stop]
        else:
            raise EngineInputError("stop must be a string, a list of strings or a list of token ids",
                                   "sampling_params.stop")
    seed = params.get("seed")
    req = SampleRequest(
        slot=slot, prompt=prompt, num_samples=_number(args.get("num_samples", 1), int, "num_samples"),
        max_tokens=(base.max_length - len(prompt) if max_tokens is None
                    else _number(max_tokens, int, "sampling_params.max_tokens")),
        temperature=_number(params.get("temperature", 1.0), float, "sampling_params.temperature"),
        top_k=_number(params.get("top_k", -1), int, "sampling_params.top_k"),
        top_p=_number(params.get("top_p", 1.0), float, "sampling_params.top_p"),
        seed=_number(seed, int, "sampling_params.seed") if seed is not None else seed_fallback(),
        stop_token_ids=stop_ids, stop_strings=stop_strings,
    )
    problem = sample_request_problem(req, base.vocab_size, base.max_length)
    if problem is not None:
        raise EngineInputError(*problem)
    return req


def _number(value: Any, kind: type, where: str):
    """`value` as an int or float; EngineInputError at `where` for anything else (a bool, a
    string, a float where an integer belongs)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and kind is int and not float(value).is_integer():
        ok = False
    if not ok:
        raise EngineInputError(f"{where.rsplit('.', 1)[-1]} must be {'an integer' if kind is int else 'a number'}, "
                               f"got {value!r}", where)
    return kind(value)


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"


@torch.no_grad()
def generate(
    base: BaseModel, requests: list[SampleRequest], pad_id: int = 0, compact: bool = True,
    share_prefill: bool = True,
) -> list[list[SampleOutput]]:
    """Decode all requests' rows together; see the module docstring.

    `compact=True` drops finished rows from the decode batch and the KV cache, so they stop
    costing compute. `share_prefill=True` runs each request's prompt once, however many
    samples it asks for, and starts its samples' rows from copies of that prompt's KV cache
    and last logits (RL asks for groups of samples per prompt: the prompt's compute is paid
    once instead of num_samples times). Results depend on neither: every request draws one
    uniform per sample per step from its own generator whether or not that sample is still
    running, rows never see each other, and a row's prompt computes the same values alone or
    copied (the switches exist so tests can check exactly that).
    """
    if not requests:
        return []
    device = base.device

    def by_slot(r: int) -> tuple[bool, int]:
        return requests[r].slot is None, requests[r].slot or 0

    # One row per sample, grouped by adapter slot (stable within a slot).
    rows = [(r_i, s_i) for r_i, req in enumerate(requests) for s_i in range(req.num_samples)]
    rows.sort(key=lambda rs: by_slot(rs[0]))
    row_slots = [requests[r].slot for r, _ in rows]
    n_rows = len(rows)
    # The prefill's rows: one per request (then copied out to its samples' rows), or one per row.
    prefill = sorted(range(len(requests)), key=by_slot) if share_prefill else [r for r, _ in rows]
    copy_out = None
    if share_prefill and len(prefill) < n_rows:
        at = {r: i for i, r in enumerate(prefill)}
        copy_out = torch.tensor([at[r] for r, _ in rows], dtype=torch.long, device=device)
    prompt_len = max(len(requests[r].prompt) for r in prefill)

    input_ids = torch.full((len(prefill), prompt_len), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prefill), prompt_len), dtype=torch.long)
    for i, r in enumerate(prefill):
        prompt = requests[r].prompt
        input_ids[i, prompt_len - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[i, prompt_len - len(prompt):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)

    generators = {}
    for r_i, req in enumerate(requests):
        g = torch.Generator()  # on the host: the same draws on every device
        g.manual_seed(int(req.seed))
        generators[r_i] = g

    max_new = max(requests[r].max_tokens for r, _ in rows)
    out_tokens: list[list[int]] = [[] for _ in rows]
    out_logprobs: list[list[float]] = [[] for _ in rows]
    stop_reason: list[Optional[str]] = [None] * n_rows
    tokenizer = base.tokenizer

    alive = list(range(n_rows))  # the original row of each row in the decode batch, in order
    routing = LoRARouting(base.lora_layers, spans_for_rows([requests[r].slot for r in prefill]), per_row=True)
    cache_arg = _cache_argument(base.model)
    cache = None
    sampling: Optional[RowSampling] = None  # for the rows in `alive`
    step_ids = input_ids
    for _ in range(max_new):
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        with routing:
            out = base.model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            )
        cache = getattr(out, cache_arg)
        logits = out.logits[:, -1, :].float()  # [alive, V]
        if copy_out is not None:  # the prefill ran once per request: one copy per sample row
            cache.batch_select_indices(copy_out)
            logits, attention = logits[copy_out], attention[copy_out]
            routing.spans = tuple(spans_for_rows(row_slots))
            copy_out = None
        if sampling is None:
            sampling = RowSampling.of([rows[i] for i in alive], requests, logits.shape[-1], device)
        next_tokens = _choose(logits, sampling, requests, generators)
        chosen_lp = torch.log_softmax(logits, dim=-1).gather(-1, next_tokens[:, None])[:, 0].tolist()
        next_list = next_tokens.tolist()
        for b, i in enumerate(alive):
            if stop_reason[i] is not None:
                continue
            req = requests[rows[i][0]]
            out_tokens[i].append(next_list[b])
            out_logprobs[i].append(chosen_lp[b])
            if next_list[b] in req.stop_token_ids:
                stop_reason[i] = "stop"
            elif req.stop_strings and _ends_with_stop(tokenizer, out_tokens[i], req.stop_strings):
                stop_reason[i] = "stop"
            elif len(out_tokens[i]) >= req.max_tokens:
                stop_reason[i] = "length"
        if all(reason is not None for reason in stop_reason):
            break
        step_ids = next_tokens[:, None]
        attention = torch.cat([attention, attention.new_ones(len(alive), 1)], dim=1)
        keep = [b for b, i in enumerate(alive) if stop_reason[i] is None]
        if compact and len(keep) < len(alive):
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(keep_t)
            step_ids, attention = step_ids[keep_t], attention[keep_t]
            alive = [alive[b] for b in keep]
            sampling = None
            routing.spans = tuple(spans_for_rows([row_slots[i] for i in alive]))

    results: list[list[SampleOutput]] = [[None] * req.num_samples for req in requests]  # type: ignore[list-item]
    for i, (r, s) in enumerate(rows):
        results[r][s] = SampleOutput(out_tokens[i], out_logprobs[i], stop_reason[i] or "length")
    return results


def _cache_argument(model) -> str:
    """The KV cache's name in the model's forward and output: `cache` since transformers
    5.2x deprecated `past_key_values` (which still works there, with a warning per call;
    older 5.x releases, such as the GPU machine's, know only `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class RowSampling:
    """The decode batch's per-row sampling settings as tensors: built when the batch's rows
    change (at the start, and when finished rows are dropped), not at every decode step."""

    rows: list[tuple[int, int]]  # (request, sample) of each row
    greedy: torch.Tensor  # bool [rows]
    all_greedy: bool
    temperature: torch.Tensor  # [rows]; 1 for greedy rows (their argmax is used)
    top_k: Optional[torch.Tensor]  # long [rows], vocab = no cut; None when no row cuts
    # [rows]; inf for rows without a nucleus: a float32 cumsum overshoots 1 in the tail, so
    # comparing such rows against 1.0 would drop tail tokens whenever a co-tenant's row
    # asks for top_p. None when no row has a nucleus.
    top_p: Optional[torch.Tensor]

    @classmethod
    def of(cls, rows: list[tuple[int, int]], requests: list[SampleRequest], vocab: int,
           device: torch.device) -> "RowSampling":
        params = [requests[r] for r, _ in rows]
        greedy = [req.temperature <= 0 for req in params]
        top_k = [req.top_k if req.top_k is not None and 0 < req.top_k < vocab else vocab for req in params]
        top_p = [req.top_p if req.top_p < 1.0 else float("inf") for req in params]
        return cls(
            rows=rows,
            greedy=torch.tensor(greedy, device=device),
            all_greedy=all(greedy),
            temperature=torch.tensor([1.0 if g else req.temperature for g, req in zip(greedy, params)],
                                     device=device),
            top_k=torch.tensor(top_k, device=device) if any(k < vocab for k in top_k) else None,
            top_p=torch.tensor(top_p, device=device) if any(p < 1.0 for p in top_p) else None,
        )


def _choose(
    logits: torch.Tensor,
    sampling: RowSampling,
    requests: list[SampleRequest],
    generators: dict[int, torch.Generator],
) -> torch.Tensor:
    """Next token of every row in the batch (logits [rows, V], fp32).

    All rows at once, whatever their requests' temperature, top_k and top_p: a handful of
    batched ops per decode step, not a handful per request (which on a GPU would be dozens
    of tiny kernel launches per step). Sampling is by inverse CDF with one uniform per
    sample of the request, drawn for all of its samples every step from the request's own
    (host) generator, so a row's draw depends neither on which rows are still running nor on
    the device.
    """
    choice = logits.argmax(-1)
    if sampling.all_greedy:
        return choice
    draws: dict[int, list[float]] = {}
    for r, _ in sampling.rows:
        if r not in draws and requests[r].temperature > 0:
            draws[r] = torch.rand(requests[r].num_samples, generator=generators[r]).tolist()
    u = torch.tensor([draws[r][s] if r in draws else 0.0 for r, s in sampling.rows],
                     dtype=logits.dtype).to(logits.device)
    scaled = _filter(logits / sampling.temperature[:, None], sampling)
    cdf = torch.softmax(scaled, dim=-1).cumsum(-1)  # [rows, V]
    # right=True picks the first token whose cdf exceeds u: never a zero-mass token.
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return torch.where(sampling.greedy, choice, sampled.clamp(max=logits.shape[-1] - 1))


def _filter(scaled: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """Mask each row's logits outside its top-k, then outside its top-p nucleus, with -inf."""
    if sampling.top_k is None and sampling.top_p is None:
        return scaled
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    if sampling.top_k is not None:
        kth = ordered.gather(-1, sampling.top_k[:, None] - 1)  # [rows, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if sampling.top_p is not None:  # the nucleus is taken within the top-k
            ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    if sampling.top_p is not None:
        probs = torch.softmax(ordered, dim=-1)
        # keep a token if the mass strictly before it is < top_p (the first token always stays)
        before = torch.cumsum(probs, dim=-1) - probs
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= sampling.top_p[:, None])
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def _ends_with_stop(tokenizer, tokens: list[int], stop_strings: list[str]) -> bool:
    """True when the decoded continuation contains a stop string ending in its last token."""
    # Decoding only a tail keeps this O(stop length) per step; 16 tokens cover any stop string
    # that is not absurdly long relative to the vocabulary.
    tail = tokenizer.decode(tokens[-16:], skip_special_tokens=False)
    head = tokenizer.decode(tokens[-16:-1], skip_special_tokens=False) if len(tokens) > 1 else ""
    return any(stop in tail and stop not in head for stop in stop_strings)

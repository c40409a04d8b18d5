"""Multi-tenant training: K adapters in one packed engine pass vs the same work in plain PEFT.

For each K: every adapter has `--seqs` sequences of `--tokens` tokens. The engine runs one
forward_backward over all K adapters' data plus the K optim steps in one call (as a
server cycle applies them); the PEFT baseline switches one
PeftModel between K adapters and runs one forward_backward + AdamW step per adapter, on the
same tokens. A third figure is the packing ceiling: one plain batched PEFT step (a single
adapter, all K adapters' sequences in one [K * seqs, tokens] batch, one AdamW step), what
the same tokens cost when nothing has to keep tenants apart. Prints one JSON line per K
with the three times, the speedup over serial PEFT, the fraction of the ceiling the engine
reaches, and (on CUDA) each configuration's peak memory.

    python benchmarks/bench_multitenant.py --device cpu
    python benchmarks/bench_multitenant.py --device cuda --model qwen3-0.6b --seqs 4 --tokens 128
"""

from __future__ import annotations

import numpy as np
import torch

from _machine import (allocated_gb, arg_parser, build_model, device_and_dtype, emit, engine_with_model,
                      free_device_memory, machine, peak_of, peft_with_adapters, timed_interleaved)

ADAM = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)


def make_data(k: int, seqs: int, tokens: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (k, seqs, tokens + 1))


def engine_step_fn(engine, model_name, data, rank):
    from server.engine.engine import AdapterConfig, EngineDatum, ForwardItem

    ids = []
    for k in range(data.shape[0]):
        ids.append(f"mt-{k}")
        engine.create_adapter(ids[-1], model_name, AdapterConfig(rank=rank, seed=k, train_unembed=False))
    items = [
        ForwardItem(aid, [EngineDatum(seq[:-1], {"target_tokens": seq[1:], "weights": np.ones(len(seq) - 1, np.float32)})
                          for seq in data[k]])
        for k, aid in enumerate(ids)
    ]

    def step():
        engine.forward(items, backward=True)
        engine.optim_steps([(aid, ADAM) for aid in ids])  # as the server applies a cycle's steps
    return step


def peft_step_fn(model, data, rank, device):
    return peft_step_fns(model, data, rank, device)[0]


def peft_step_fns(model, data, rank, device):
    """(serial, batched) PEFT steps on one PeftModel over `model`: serial switches between K
    adapters, one forward_backward + AdamW step each on its own sequences; batched is the
    packing ceiling, one extra adapter taking all K * seqs sequences in one batch and one
    AdamW step."""
    k_count = data.shape[0]
    names = [f"a{k}" for k in range(k_count)]
    pm = peft_with_adapters(model, [*names, "batched"], rank)
    optimizers = {}
    for name in [*names, "batched"]:
        params = [p for n, p in pm.named_parameters() if f".{name}." in n]
        optimizers[name] = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    batches = [torch.as_tensor(data[k], device=device) for k in range(k_count)]
    everything = torch.as_tensor(data.reshape(-1, data.shape[-1]), device=device)

    def train(name, ids):
        pm.set_adapter(name)
        logits = pm(input_ids=ids[:, :-1], use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    def serial():
        for k in range(k_count):
            train(names[k], batches[k])

    def batched():
        train("batched", everything)
    return serial, batched


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--ks", default="1,4,8,16", help="comma-separated adapter counts")
    parser.add_argument("--seqs", type=int, default=4, help="sequences per adapter")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lora-impl", default="auto", choices=["auto", "loop", "grouped"],
                        help="the engine's LoRA math")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa_mask", "flex"])
    parser.add_argument("--row-length", type=int, default=None, help="packed row length (default: longest sequence)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the batched PEFT step (the packing ceiling)")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    for k in [int(x) for x in args.ks.split(",")]:
        engine = engine_with_model(args.model, device, dtype, lora_impl=args.lora_impl,
                                   attention=args.attention, row_length=args.row_length)
        lora_impl, attention = engine.lora_impl, engine.attention
        base = engine.bases[args.model]
        data = make_data(k, args.seqs, args.tokens, min(base.vocab_size, 4096))
        model, _ = build_model(args.model, device, dtype)
        model.requires_grad_(False)
        serial, batched = peft_step_fns(model, data, args.rank, device)
        fns = {"engine": engine_step_fn(engine, args.model, data, args.rank), "peft_serial": serial}
        if not args.no_ceiling:
            fns["peft_batched"] = batched
        seconds = dict(zip(fns, timed_interleaved(list(fns.values()), device, args.repeats)))
        resident = allocated_gb(device)  # both models, every adapter and its AdamW state
        peaks = {f"{name}_peak_gb": peak_of(fn, device) for name, fn in fns.items()}
        del engine, base, model, fns, serial, batched
        free_device_memory(device)
        tokens = k * args.seqs * args.tokens
        engine_s, peft_s = seconds["engine"], seconds["peft_serial"]
        batched_s = seconds.get("peft_batched")
        emit({
            "bench": "multitenant", "model": args.model, "adapters": k, "seqs_per_adapter": args.seqs,
            "tokens_per_seq": args.tokens, "rank": args.rank, "tokens": tokens,
            "engine_s": round(engine_s, 4), "peft_serial_s": round(peft_s, 4),
            "peft_batched_s": None if batched_s is None else round(batched_s, 4),
            "engine_tokens_per_s": round(tokens / engine_s, 1), "peft_tokens_per_s": round(tokens / peft_s, 1),
            "peft_batched_tokens_per_s": None if batched_s is None else round(tokens / batched_s, 1),
            "speedup": round(peft_s / engine_s, 3),
            # 1.0 = the engine trains K tenants as fast as one plain batch of the same tokens
            "fraction_of_ceiling": None if batched_s is None else round(batched_s / engine_s, 3),
            "resident_gb": resident, **peaks,
            "lora_impl": lora_impl, "attention": attention, "machine": machine(device, dtype),
        })


if __name__ == "__main__":
    main()

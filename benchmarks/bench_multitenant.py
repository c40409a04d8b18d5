"""Multi-tenant training: K adapters in one packed engine pass vs the same work in plain PEFT.

For each K: every adapter has `--seqs` sequences of `--tokens` tokens. The engine runs one
forward_backward over all K adapters' data plus the K optim steps in one call (as a
server cycle applies them); the PEFT baseline switches one
PeftModel between K adapters and runs one forward_backward + AdamW step per adapter, on the
same tokens. Prints one JSON line per K with both times and the speedup.

    python benchmarks/bench_multitenant.py --device cpu
    python benchmarks/bench_multitenant.py --device cuda --model qwen3-0.6b --seqs 4 --tokens 128
"""

from __future__ import annotations

import numpy as np
import torch

from _machine import (arg_parser, build_model, device_and_dtype, emit, engine_with_model, machine,
                      peft_with_adapters, timed_interleaved)

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
    k_count = data.shape[0]
    pm = peft_with_adapters(model, [f"a{k}" for k in range(k_count)], rank)
    optimizers = []
    for k in range(k_count):
        params = [p for n, p in pm.named_parameters() if f".a{k}." in n]
        optimizers.append(torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0))
    batches = [torch.as_tensor(data[k], device=device) for k in range(k_count)]

    def step():
        for k in range(k_count):
            pm.set_adapter(f"a{k}")
            ids = batches[k]
            logits = pm(input_ids=ids[:, :-1], use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            loss.backward()
            optimizers[k].step()
            optimizers[k].zero_grad(set_to_none=True)
    return step


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
        engine_s, peft_s = timed_interleaved(
            [engine_step_fn(engine, args.model, data, args.rank), peft_step_fn(model, data, args.rank, device)],
            device, args.repeats,
        )
        del engine, base, model
        tokens = k * args.seqs * args.tokens
        emit({
            "bench": "multitenant", "model": args.model, "adapters": k, "seqs_per_adapter": args.seqs,
            "tokens_per_seq": args.tokens, "rank": args.rank, "tokens": tokens,
            "engine_s": round(engine_s, 4), "peft_serial_s": round(peft_s, 4),
            "engine_tokens_per_s": round(tokens / engine_s, 1), "peft_tokens_per_s": round(tokens / peft_s, 1),
            "speedup": round(peft_s / engine_s, 3), "lora_impl": lora_impl, "attention": attention,
            "machine": machine(device, dtype),
        })


if __name__ == "__main__":
    main()

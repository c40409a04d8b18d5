"""Training throughput of the engine: tokens/s and MFU of packed LoRA forward_backward + step.

MFU counts 4 x (base parameters) FLOPs per token: 2 for the forward and 2 for the backward's
activation gradients (the frozen base needs no weight gradients), over the device's dense
bf16 peak (benchmarks/_machine.py); CPUs report MFU as null.

    python benchmarks/bench_train_throughput.py --device cpu
    python benchmarks/bench_train_throughput.py --device cuda --model qwen3-1.7b --seqs 16 --tokens 2048
"""

from __future__ import annotations

from _machine import (allocated_gb, arg_parser, device_and_dtype, emit, engine_with_model, machine, peak_flops,
                      peak_gb, reset_peak, timed)
from bench_multitenant import engine_step_fn, make_data


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--seqs", type=int, default=4, help="sequences per adapter")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    engine = engine_with_model(args.model, device, dtype, token_budget=args.token_budget)
    base = engine.bases[args.model]
    params = sum(p.numel() for p in base.model.parameters())
    data = make_data(args.adapters, args.seqs, args.tokens, min(base.vocab_size, 4096))
    step = engine_step_fn(engine, args.model, data, args.rank)
    reset_peak(device)  # every timed step does the same work: the window's peak is one step's
    seconds = timed(step, device, args.repeats)
    peak = peak_gb(device)
    resident = allocated_gb(device)  # the model, the adapters and their AdamW state
    tokens = args.adapters * args.seqs * args.tokens
    tps = tokens / seconds
    flops = peak_flops(device)
    emit({
        "bench": "train_throughput", "model": args.model, "params": params, "adapters": args.adapters,
        "seqs": args.adapters * args.seqs, "tokens_per_seq": args.tokens, "token_budget": args.token_budget,
        "tokens": tokens, "rank": args.rank, "seconds": round(seconds, 4), "tokens_per_s": round(tps, 1),
        "flops_per_token": 4 * params, "mfu": None if flops is None else round(4 * params * tps / flops, 4),
        "resident_gb": resident, "peak_gb": peak,
        "lora_impl": engine.lora_impl, "attention": engine.attention, "machine": machine(device, dtype),
    })


if __name__ == "__main__":
    main()

"""Decode throughput: our batched multi-LoRA sampler vs HF generate with PEFT mixed adapters.

P prompts spread round-robin over A adapters, S samples per prompt (`--samples`; the engine
takes num_samples=S, HF generate the prompts repeated S times, the same P * S rows), greedy
unless `--temperature` > 0 (then plain sampling, no top-k/top-p on either side), exactly N
new tokens each (no stop tokens). Figures: our tokens/s, HF `generate(adapter_names=...)` tokens/s on a PeftModel with
the same adapters, our tokens/s on the base model alone (multi-LoRA overhead), HF `generate`
on the base model alone (adapters disabled; `--no-hf-base` skips it), and on CUDA the peak
memory of each.

    python benchmarks/bench_decode.py --device cpu
    python benchmarks/bench_decode.py --device cuda --model qwen3-0.6b --prompts 64 --new-tokens 128
    python benchmarks/bench_decode.py --device cpu --model smollm2-135m --prompts 32 --samples 4 \
        --new-tokens 32 --adapters 4 --temperature 1.0 --repeats 3    # RL-style sampling
"""

from __future__ import annotations

import numpy as np
import torch

from _machine import (allocated_gb, arg_parser, build_model, device_and_dtype, emit, engine_with_model, machine,
                      peak_gb, peft_with_adapters, reset_peak, timed)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=None, help="default 64 on CUDA, 16 on CPU")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-hf-base", action="store_true", help="skip HF generate on the base model alone")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    n_prompts = args.prompts or (64 if device.type == "cuda" else 16)
    new_tokens = args.new_tokens or (128 if device.type == "cuda" else 32)

    from server.engine.engine import AdapterConfig
    from server.engine.sampler import SampleRequest

    engine = engine_with_model(args.model, device, dtype)
    base = engine.bases[args.model]
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, min(base.vocab_size, 4096), (n_prompts, args.prompt_tokens)).tolist()
    adapters = []
    for a in range(args.adapters):
        ad = engine.create_adapter(f"d-{a}", args.model, AdapterConfig(rank=args.rank, seed=a, train_unembed=False))
        with torch.no_grad():  # non-zero B so the adapters change the output
            for pair in ad.pairs.values():
                pair.lora_B.normal_(0, 0.01)
        adapters.append(ad)

    def ours(with_adapters: bool):
        reqs = [SampleRequest(adapters[i % len(adapters)].slot if with_adapters else None, p, args.samples,
                              new_tokens, temperature=args.temperature, seed=i) for i, p in enumerate(prompts)]
        return lambda: engine.sample(args.model, reqs)

    reset_peak(device)  # every timed run does the same work: the window's peak is one run's
    ours_s = timed(ours(True), device, args.repeats)
    ours_peak = peak_gb(device)
    base_s = timed(ours(False), device, args.repeats)

    model, _ = build_model(args.model, device, dtype)
    pm = peft_with_adapters(model, [f"d-{a}" for a in range(args.adapters)], args.rank)
    with torch.no_grad():
        for a in range(args.adapters):
            for name, pair in adapters[a].pairs.items():
                module = pm.base_model.model.get_submodule(name)
                module.lora_A[f"d-{a}"].weight.copy_(pair.lora_A)
                module.lora_B[f"d-{a}"].weight.copy_(pair.lora_B)
    pm.eval()
    ids = torch.as_tensor(prompts, device=device).repeat_interleave(args.samples, dim=0)
    names = [f"d-{i % args.adapters}" for i in range(n_prompts) for _ in range(args.samples)]
    sampling = (dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0
                else dict(do_sample=False))

    def hf():
        with torch.no_grad():
            pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **sampling)
    reset_peak(device)
    hf_s = timed(hf, device, args.repeats)
    hf_peak = peak_gb(device)
    hf_base_s = None
    if not args.no_hf_base:
        def hf_base():
            with torch.no_grad(), pm.disable_adapter():
                pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=0, **sampling)
        hf_base_s = timed(hf_base, device, args.repeats)
    total = n_prompts * args.samples * new_tokens
    emit({
        "bench": "decode", "model": args.model, "prompts": n_prompts, "samples_per_prompt": args.samples,
        "new_tokens": new_tokens, "temperature": args.temperature,
        "adapters": args.adapters, "rank": args.rank, "ours_tokens_per_s": round(total / ours_s, 1),
        "hf_peft_tokens_per_s": round(total / hf_s, 1), "base_only_tokens_per_s": round(total / base_s, 1),
        "hf_base_tokens_per_s": None if hf_base_s is None else round(total / hf_base_s, 1),
        "speedup_vs_hf_peft": round(hf_s / ours_s, 3), "multi_lora_overhead": round(ours_s / base_s - 1, 4),
        "speedup_vs_hf_base": None if hf_base_s is None else round(hf_base_s / ours_s, 3),
        # peaks count what is resident: our model alone for ours, both models for HF's
        "resident_gb": allocated_gb(device), "ours_peak_gb": ours_peak, "hf_peft_peak_gb": hf_peak,
        "lora_impl": engine.lora_impl, "machine": machine(device, dtype),
    })


if __name__ == "__main__":
    main()

"""Quickstart: supervised fine-tuning of the built-in tiny model, end to end.

    python -m workbench.quickstart            # embedded local server, tiny-qwen3
    python -m workbench.quickstart --steps 60 --base-model tiny-llama

Teaches the model a small key -> value recall task through its chat template, training only
on the assistant's answers (loss weights 0 on the prompt), then samples an answer.
Every GPU-touching step is a call to the server; the loop itself is plain Python.
"""

from __future__ import annotations

import argparse
import time

import workbench as wb
from workbench import types
from workbench.data import datum_from_model_input_weights

FACTS = {
    "apple": "red", "sky": "blue", "grass": "green", "snow": "white",
    "coal": "black", "banana": "yellow", "orange": "orange", "plum": "purple",
}


def conversation(thing: str, color: str) -> list[dict]:
    return [
        {"role": "user", "content": f"What color is the {thing}?"},
        {"role": "assistant", "content": f"The {thing} is {color}."},
    ]


def build_datum(tokenizer, messages: list[dict]) -> types.Datum:
    """Tokens of the whole chat; weight 1 on the assistant's reply, 0 on the prompt."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(messages, return_dict=False)
    assert full[: len(prompt)] == prompt, "the chat template must extend the prompt"
    weights = [0.0] * len(prompt) + [1.0] * (len(full) - len(prompt))
    # Next-token alignment (input position i predicts token i + 1), as the recipes do it.
    return datum_from_model_input_weights(types.ModelInput.from_ints(full), weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="tiny-qwen3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--base-url", default=None, help="a running server (default: embedded)")
    args = parser.parse_args(argv)

    started = time.time()
    service = wb.ServiceClient(base_url=args.base_url)
    print(f"server: {service.base_url}{' (embedded)' if service.local_server else ''}")
    training = service.create_lora_training_client(base_model=args.base_model, rank=args.rank, seed=0)
    tokenizer = training.get_tokenizer()
    data = [build_datum(tokenizer, conversation(t, c)) for t, c in FACTS.items()]
    n_target = sum(sum(d.loss_fn_inputs["weights"].data) for d in data)
    print(f"run {training.model_id}: {len(data)} conversations, {int(n_target)} trained tokens")

    adam = types.AdamParams(learning_rate=args.learning_rate)
    for step in range(args.steps):
        # Submit both before waiting: the server runs them in the same clock cycle.
        fb = training.forward_backward(data, "cross_entropy")
        opt = training.optim_step(adam)
        loss = fb.result().metrics["loss:sum"] / n_target
        opt.result()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss/token {loss:.4f}")

    sampler = training.save_weights_and_get_sampling_client("quickstart")
    question = [{"role": "user", "content": "What color is the sky?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
    result = sampler.sample(
        prompt=types.ModelInput.from_ints(prompt),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=24, temperature=0.0),
    ).result()
    seq = result.sequences[0]
    print(f"sample: {question[0]['content']!r} -> {tokenizer.decode(seq.tokens, skip_special_tokens=True)!r}"
          f" ({len(seq.tokens)} tokens, stop_reason={seq.stop_reason})")
    print(f"done in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()

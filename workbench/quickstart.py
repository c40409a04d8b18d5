"""Quickstart: teach a real language model facts it cannot know, end to end, on a CPU.

    python -m workbench.quickstart                          # SmolLM2-135M-Instruct: ~80 s on 2 CPU cores
    python -m workbench.quickstart --base-model tiny-qwen3  # a ~15-second smoke run (random tiny model)
    python -m workbench.quickstart --no-replay              # invented facts only: watch it forget real ones
    python -m workbench.quickstart --base-model Qwen/Qwen3-0.6B   # on a GPU server

The model is asked the capitals of 8 invented countries ("What is the capital of Veltoria?"):
it cannot know them and makes something up. A LoRA adapter is trained on 32 such questions
(4 phrasings) with their answers ("The capital of Veltoria is Quorin."), mixed with 16 about
real countries so that it keeps what it knows, with the loss on the answers only. Then it is
asked again, with held-out questions: the invented facts in 4 phrasings it never saw in
training (exact match of greedy answers, and the mean negative log-likelihood of the true
answers, in nats per token), and 8 other real countries (does it still name their capitals?).
Every step that runs the model is a call to the server (embedded here); the loop is plain Python.
"""

from __future__ import annotations

import argparse
import time

from tqdm.auto import tqdm

import workbench as wb
from workbench import renderers, types
from workbench.data import SupervisedDataset, conversation_to_datum
from workbench.eval import NLLEvaluator
from workbench.tasks import CAPITALS, REAL_CAPITALS, CapitalsTask, Problem

DEFAULT_MODEL = "smollm2-135m"


def ask(sampler, renderer, problems: list[Problem], max_tokens: int = 24) -> list[str]:
    """Greedy answers to every problem's question, on one line each. All requests are
    submitted before any is awaited, so the server samples them together."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.get_stop_sequences())
    futures = [sampler.sample(renderer.build_generation_prompt(p.prompt_messages()), 1, params)
               for p in problems]
    answers = []
    for future in futures:
        message, ended = renderer.parse_response(future.result().sequences[0].tokens)
        text = " ".join(message["content"].split())
        answers.append(text if ended else text + " ...")  # "...": cut at max_tokens
    return answers


def examples(problems: list[Problem], templates: tuple[str, ...]) -> list[Problem]:
    """One question per phrasing, each about a different country."""
    picked: list[Problem] = []
    for template in templates:
        head, _, tail = template.partition("{country}")
        for p in problems:
            if p.question.startswith(head) and p.question.endswith(tail) and \
                    all(p.answer != q.answer for q in picked):
                picked.append(p)
                break
    return picked


def countries(problems: list[Problem]) -> list[str]:
    return [c for c, _ in REAL_CAPITALS if any(c in p.question for p in problems)]


def show(problems: list[Problem], answers: list[str], width: int = 76) -> None:
    for p, answer in zip(problems, answers):
        shown = answer if len(answer) <= width else answer[: width - 3] + "..."
        print(f"  {'✓' if p.check(answer) else '✗'} {p.question}\n      {shown}")


def score(problems: list[Problem], answers: list[str]) -> int:
    return sum(p.check(a) for p, a in zip(problems, answers))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=DEFAULT_MODEL,
                        help=f"a built-in name, a Hugging Face id, a .gguf file or a local model directory "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps (default 32: about 5 epochs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="Adam learning rate (default 1e-3; 3e-3 for the random tiny-* models)")
    parser.add_argument("--countries", type=int, default=8, help="invented countries to learn (1-12)")
    parser.add_argument("--no-replay", action="store_true",
                        help="train on the invented countries only (no real ones mixed in)")
    parser.add_argument("--seed", type=int, default=0, help="LoRA init, data split and order")
    parser.add_argument("--base-url", default=None, help="a running server (default: embedded)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    if not 1 <= args.countries <= len(CAPITALS):
        parser.error(f"--countries must be in 1..{len(CAPITALS)}")
    steps = args.steps
    lr = args.learning_rate or (3e-3 if args.base_model.startswith("tiny-") else 1e-3)

    started = time.time()
    task = CapitalsTask(n_countries=args.countries)
    n_phrasings = len(task.train_templates)
    train, held_out = task.split(n_train=args.countries * n_phrasings, n_test=args.countries * n_phrasings,
                                 seed=args.seed)
    known_train, known_held_out = task.known_split(n_train=0 if args.no_replay else 16, n_test=8, seed=args.seed)
    print(f"Teaching {args.base_model} the capitals of {args.countries} invented countries.")
    if args.base_model.startswith("tiny-"):
        print("  (tiny-* models have random weights: a smoke run of the pipeline. They learn the answer's"
              " format, not the facts.)")
    print(f"  train on : {len(train)} questions in {n_phrasings} phrasings, e.g. {train[0].question!r}"
          f" -> {train[0].answer!r}")
    if known_train:
        print(f"             + {len(known_train)} about real countries, so it keeps what it knows "
              f"({', '.join(countries(known_train))})")
    print(f"  held out : the same facts in {len(task.held_out_templates)} phrasings never trained on "
          f"({len(held_out)} questions), e.g. {held_out[0].question!r}")
    print(f"             + {len(known_held_out)} real countries never trained on "
          f"({', '.join(countries(known_held_out))})")

    service = wb.ServiceClient(base_url=args.base_url)
    print(f"server: {service.base_url}{' (embedded)' if service.local_server else ''}; "
          f"loading {args.base_model} (a first run may convert it once)")
    training = service.create_lora_training_client(base_model=args.base_model, rank=args.rank, seed=args.seed)
    tokenizer = training.get_tokenizer()
    renderer_name = renderers.get_recommended_renderer_name(args.base_model)
    renderer = renderers.get_renderer(renderer_name, tokenizer)
    train_data = [conversation_to_datum(p.conversation(), renderer) for p in train + known_train]
    held_out_nll = NLLEvaluator([conversation_to_datum(p.conversation(), renderer) for p in held_out],
                                name="held_out")
    print(f"run {training.model_id}: LoRA rank {args.rank}, renderer {renderer_name!r}, "
          f"{len(train_data)} conversations of ~{sum(d.model_input.length for d in train_data) // len(train_data)}"
          f" tokens, loss on the answer only [{time.time() - started:.0f} s]")

    shown = examples(held_out, task.held_out_templates) + known_held_out[:1]
    questions = held_out + known_held_out

    def measure(sampler, when: str) -> tuple[list[str], float]:
        t0 = time.time()
        answers = ask(sampler, renderer, questions)
        nll = held_out_nll(training)["eval/held_out/nll"]  # a forward pass: no gradients
        by_question = dict(zip((p.question for p in questions), answers))
        print(f"\n{when} [{time.time() - t0:.0f} s]:")
        show(shown, [by_question[p.question] for p in shown])
        return answers, nll

    # Before: the base model. (A new adapter starts at zero, so the training client's forward
    # pass scores the base model too.)
    before, nll_before = measure(service.create_sampling_client(base_model=args.base_model),
                                 "BEFORE training, held-out questions")
    em_before, known_before = score(held_out, before), score(known_held_out, before[len(held_out):])
    print(f"  invented countries: {em_before}/{len(held_out)} exact, NLL of the true answers "
          f"{nll_before:.2f} nats/token; real countries named right: {known_before}/{len(known_held_out)}")

    # Train: forward_backward and optim_step submitted back to back (one server cycle each step).
    t0 = time.time()
    dataset = SupervisedDataset(train_data, batch_size=args.batch_size, seed=args.seed)
    adam = types.AdamParams(learning_rate=lr)
    print(f"\nTRAINING: {steps} steps of {args.batch_size} conversations, Adam lr {lr:g}")
    losses = []
    with tqdm(total=steps, desc="training", unit="step", ncols=80) as bar:
        for step in range(steps):
            epoch, index = divmod(step, len(dataset))
            if index == 0:
                dataset.set_epoch(epoch)
            batch = dataset.get_batch(index)
            fb = training.forward_backward(batch, "cross_entropy")
            opt = training.optim_step(adam)
            n_answer_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
            losses.append(fb.result().metrics["loss:sum"] / n_answer_tokens)
            opt.result()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    print("  loss per answer token: " + ", ".join(f"{losses[i]:.3f} (step {i})" for i in marks)
          + f" [{time.time() - t0:.0f} s]")

    # After: the trained adapter, on the same questions.
    after, nll_after = measure(training.save_weights_and_get_sampling_client("quickstart"),
                               "AFTER training, the same held-out questions")
    em_after, known_after = score(held_out, after), score(known_held_out, after[len(held_out):])
    print(f"  invented countries: {em_before}/{len(held_out)} -> {em_after}/{len(held_out)} exact, "
          f"NLL of the true answers {nll_before:.2f} -> {nll_after:.3f} nats/token")
    print(f"  real countries named right: {known_before}/{len(known_held_out)} -> "
          f"{known_after}/{len(known_held_out)}")
    for p, was, now in zip(known_held_out, before[len(held_out):], after[len(held_out):]):
        if p.check(was) and not p.check(now):
            print(f"    forgot: {p.question!r} -> {now[:60]!r}")
    elapsed = time.time() - started
    print(f"\ndone in {elapsed:.0f} s")
    if known_train and known_before:
        print("(Try --no-replay: trained on the invented countries alone, it forgets real capitals.)")
    return {"exact_match_before": em_before / len(held_out), "exact_match_after": em_after / len(held_out),
            "nll_before": nll_before, "nll_after": nll_after, "known_before": known_before / len(known_held_out),
            "known_after": known_after / len(known_held_out), "final_loss": losses[-1], "seconds": elapsed}


if __name__ == "__main__":
    main()

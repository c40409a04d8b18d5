"""Direct preference optimisation on preference pairs derived from a synthetic task.

    python -m workbench.recipes.dpo --task recall --n-steps 20 --log-dir runs/dpo

Pairs: chosen = the problem's correct answer, rejected = the answer of another problem (a
wrong one). On the recall task a held-out question asks a key the training pairs asked
through other templates, so the learnt preference transfers to held-out pairs. The loss runs
on the client through forward_backward_custom:

    -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

summed over each response's tokens, averaged over pairs. The reference is the weights the
run starts from, scored once up front with a sampling client's compute_logprobs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import SupervisedDataset, conversation_to_datum, target_logprobs
from ..types import AdamParams, Datum
from . import common


@dataclass(frozen=True)
class Config(common.BaseConfig):
    log_dir: str = "runs/dpo"  # metrics.jsonl, config.json and checkpoints.jsonl go here
    learning_rate: float = 1e-3  # Adam learning rate
    n_steps: int = 20  # optimizer steps
    pairs_per_batch: int = 8  # preference pairs per step
    beta: float = 0.1  # DPO temperature: how far from the reference the policy may move
    eval_every: int = 10  # held-out preference accuracy every N steps and at the end (0: end only)


def make_pairs(problems, renderer, seed: int) -> list[tuple[Datum, Datum]]:
    """(chosen, rejected) datums per problem: its answer vs another problem's different one."""
    rng = random.Random(f"dpo-pairs:{seed}")
    answers = sorted({p.answer for p in problems})
    if len(answers) < 2:
        raise ValueError("making preference pairs needs problems with at least two different answers")
    pairs = []
    for p in problems:
        wrong = rng.choice([a for a in answers if a != p.answer])
        rejected = p.prompt_messages() + [{"role": "assistant", "content": wrong}]
        pairs.append((conversation_to_datum(p.conversation(), renderer),
                      conversation_to_datum(rejected, renderer)))
    return pairs


def response_logprob(logprobs_T, datum: Datum):
    """Sum of the response tokens' logprobs (the tokens cross_entropy weights select)."""
    return (logprobs_T * datum.loss_fn_inputs["weights"].to_torch()).sum()


def reference_logprobs(reference, pairs) -> list[tuple[float, float]]:
    """Per pair, (ref log p(chosen), ref log p(rejected)); all calls submitted, then awaited."""
    import torch

    data = [d for pair in pairs for d in pair]
    scores = [float(response_logprob(torch.tensor(lps), d))
              for lps, d in zip(target_logprobs(reference, data, "pairs"), data)]
    return list(zip(scores[0::2], scores[1::2]))


def dpo_loss_fn(ref_pairs: list[tuple[float, float]], beta: float):
    """The custom loss for data laid out [chosen_0, rejected_0, chosen_1, rejected_1, ...]."""
    import torch
    import torch.nn.functional as F

    def loss_fn(data, logprobs_list):
        chosen = torch.stack([response_logprob(lp, d) for lp, d in zip(logprobs_list[0::2], data[0::2])])
        rejected = torch.stack([response_logprob(lp, d) for lp, d in zip(logprobs_list[1::2], data[1::2])])
        ref = torch.tensor(ref_pairs, dtype=chosen.dtype)  # [pairs, 2]
        margin = beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))
        loss = -F.logsigmoid(margin).mean()
        m = margin.detach()
        return loss, {"dpo/margin": float(m.mean()), "dpo/accuracy": float((m > 0).float().mean()),
                      "dpo/chosen_logprob": float(chosen.detach().mean()),
                      "dpo/rejected_logprob": float(rejected.detach().mean())}

    return loss_fn


def preference_accuracy(training, pairs, ref_pairs) -> dict[str, float]:
    """Held-out figures from a forward pass: how often the policy gives the chosen response
    more probability than the rejected one (raw, and relative to the reference: DPO's
    implicit reward), and the mean implicit-reward margin."""
    data = [d for pair in pairs for d in pair]
    out = training.forward(data, "cross_entropy").result()
    lps = [float(response_logprob(o["logprobs"].to_torch(), d)) for o, d in zip(out.loss_fn_outputs, data)]
    raw = [c > r for c, r in zip(lps[0::2], lps[1::2])]
    implicit = [(c - rc) - (r - rr) for c, r, (rc, rr) in zip(lps[0::2], lps[1::2], ref_pairs)]
    return {"eval/pref_accuracy": sum(raw) / len(raw),
            "eval/implicit_accuracy": sum(m > 0 for m in implicit) / len(implicit),
            "eval/implicit_margin": sum(implicit) / len(implicit)}


def main(config: Config) -> common.RecipeResult:
    if config.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: evaluate only at the end), got {config.eval_every}")
    service = common.make_service(config)
    training, start = common.make_training_client(service, config)
    renderer = common.make_renderer(training, config)
    train, test = common.task_split(config)
    train_pairs, test_pairs = make_pairs(train, renderer, config.seed), make_pairs(test, renderer, config.seed)
    reference = _reference_sampler(service, training, config, start)
    ref_train = reference_logprobs(reference, train_pairs)
    ref_test = reference_logprobs(reference, test_pairs) if test_pairs else []
    # Batches of pair indices, so each pair keeps its reference logprobs.
    batches = SupervisedDataset(list(range(len(train_pairs))), config.pairs_per_batch, seed=config.seed)
    log = common.MetricsLog(config.log_dir, config)
    common.print_banner(training, config, "workbench dpo", start, pairs_per_batch=config.pairs_per_batch)
    bar = common.progress(range(start, config.n_steps), config.n_steps - start, "dpo", config.progress)
    for step in bar:
        # Before the step's update, at steps 0, eval_every, 2 * eval_every, ...; eval_every 0
        # must skip step 0 too (its help says "end only"), leaving the final row at n_steps.
        due = config.eval_every > 0 and step % config.eval_every == 0
        evals = preference_accuracy(training, test_pairs, ref_test) if test_pairs and due else {}
        batches.set_epoch(step // len(batches))
        picked = batches.get_batch(step % len(batches))
        data = [d for i in picked for d in train_pairs[i]]
        loss_fn = dpo_loss_fn([ref_train[i] for i in picked], config.beta)
        metrics = common.train_step_custom(training, data, loss_fn, AdamParams(learning_rate=config.learning_rate))
        common.show(bar, log.log(step, {**evals, **metrics}))
        common.maybe_save(training, config, step)
    if test_pairs:
        log.log(config.n_steps, preference_accuracy(training, test_pairs, ref_test))
    return common.finish(training, config, log, config.n_steps - 1)


def _reference_sampler(service, training, config: Config, start: int):
    """A sampler on the weights this run started from (also when it was resumed later)."""
    if start == 0:
        return training.save_weights_and_get_sampling_client("dpo-reference")
    if config.load_checkpoint_path:
        initial = service.create_training_client_from_state(config.load_checkpoint_path)
        return initial.save_weights_and_get_sampling_client("dpo-reference")
    return service.create_sampling_client(base_model=training.base_model)  # fresh LoRA = base


if __name__ == "__main__":
    common.cli(Config, main)

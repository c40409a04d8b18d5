"""forward_backward_custom is exact: a DPO loss sent through the two-pass mechanism trains
the adapter exactly like the same loss written directly with autograd on plain PEFT.

The reference starts from the server's own initial adapter (downloaded through the
RestClient) and steps with torch.optim.AdamW; fp32 on CPU, tight tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench import types

BASE = "tiny-qwen3"
BETA = 0.5
# eps = 1 makes AdamW's update a smooth function of the gradient (close to SGD), so the final
# weights compare the gradients themselves. With a tiny eps, Adam's near-sign update turns the
# rounding noise of gradient components that are almost zero (most lm_head rows) into steps
# of full size, whichever side computed them.
ADAM = dict(learning_rate=0.02, beta1=0.9, beta2=0.95, eps=1.0, weight_decay=0.0, grad_clip_norm=0.0)


def pair_data(rng) -> list[types.Datum]:
    """[chosen0, rejected0, chosen1, rejected1]: a shared prompt (weight 0), own completions."""
    data = []
    for prompt_len, completion_len in ((5, 4), (3, 6)):
        prompt = rng.integers(5, 3000, prompt_len).tolist()
        for _ in ("chosen", "rejected"):
            tokens = prompt + rng.integers(5, 3000, completion_len).tolist()
            weights = np.r_[np.zeros(prompt_len - 1), np.ones(completion_len)]
            data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}))
    return data


def dpo_loss(weights: list[torch.Tensor], ref_logprobs: list[torch.Tensor], logprobs: list[torch.Tensor]):
    """Sum over pairs of -log sigmoid(beta * (chosen margin - rejected margin))."""
    seq = [(lp * w).sum() - (ref * w).sum() for lp, ref, w in zip(logprobs, ref_logprobs, weights)]
    margins = torch.stack([seq[i] - seq[i + 1] for i in range(0, len(seq), 2)])
    loss = -torch.nn.functional.logsigmoid(BETA * margins).sum()
    return loss, {"margin:mean": float(margins.detach().mean())}


def test_dpo_via_forward_backward_custom_matches_autograd(service, tmp_path):
    import peft
    from server.tiny import build_tiny_model

    rng = np.random.default_rng(11)
    data = pair_data(rng)
    weights = [d.loss_fn_inputs["weights"].to_torch() for d in data]
    training = service.create_lora_training_client(BASE, rank=4, seed=5)

    # Reference logprobs from a frozen forward before any step; the plain-PEFT twin starts
    # from the very adapter the server initialised.
    frozen = training.forward(data, "cross_entropy").result(60)
    ref_logprobs = [o["logprobs"].to_torch() for o in frozen.loss_fn_outputs]
    init = training.save_state("init").result(60).path
    rest = service.create_rest_client()
    model = peft.PeftModel.from_pretrained(build_tiny_model(BASE), rest.download_checkpoint(init, tmp_path / "init")
                                           .result(60), is_trainable=True)
    model.eval()  # no dropout; gradients still flow
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=ADAM["learning_rate"], betas=(0.9, 0.95), eps=ADAM["eps"], weight_decay=0.0)

    def user_loss(batch, logprobs):
        assert batch is data or [d.model_input for d in batch] == [d.model_input for d in data]
        return dpo_loss(weights, ref_logprobs, logprobs)

    losses = []
    for step in range(2):  # step 0 moves only lora_B (it starts at 0); step 1 both
        out = training.forward_backward_custom(data, user_loss)
        metrics = training.optim_step(types.AdamParams(**ADAM)).result(60).metrics
        result = out.result(60)

        opt.zero_grad(set_to_none=True)
        lps = []
        for d in data:
            ids = torch.tensor(d.model_input.to_ints())[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            lps.append(logp.gather(-1, d.loss_fn_inputs["target_tokens"].to_torch()[:, None])[:, 0])
        loss, ref_metrics = dpo_loss(weights, ref_logprobs, lps)
        loss.backward()
        losses.append(float(loss.detach()))
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        opt.step()

        assert result.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6), step
        assert result.metrics["margin:mean"] == pytest.approx(ref_metrics["margin:mean"], rel=1e-5, abs=1e-5)
        assert metrics["grad_norm:mean"] == pytest.approx(grad_norm, rel=1e-4), step
    assert losses[1] < losses[0]  # the first step moved the pairs towards the chosen completions

    from safetensors.torch import load_file

    final = rest.download_checkpoint(training.save_state("final").result(60).path, tmp_path / "final").result(60)
    trained = load_file(f"{final}/adapter_model.safetensors")
    ours = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    assert trained.keys() == ours.keys()
    moved = max(float(t.abs().max()) for k, t in trained.items() if "lora_B" in k)
    assert moved > 1e-3
    worst = max(float((trained[k] - ours[k].detach()).abs().max()) for k in trained)
    assert worst <= 1e-5, f"max abs weight difference {worst:.3g} after 2 DPO steps"

"""Trainer subclasses of the stages.

Kept out of the stage modules because importing transformers' Trainer pulls in peft and
bitsandbytes (seconds): `import stages.sft` stays light, and `run_sft` imports the class.
"""

from __future__ import annotations

import torch
from transformers import Seq2SeqTrainer, Trainer


class SupervisedTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer for decoder-only models: generate from the prompt alone, return only new tokens."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        labels = inputs.pop("labels", None)  # the reference answer: never fed to generate()
        prompt_len = inputs["input_ids"].size(-1)
        _, generated, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        generated = generated[:, prompt_len:] if generated is not None else None
        return None, generated, labels


class PairwiseTrainer(Trainer):
    """Reward-model trainer: loss -log sigmoid(r_chosen - r_rejected) over the pairs of a batch.

    r is the value head's score at each row's last real token: the one-label sequence
    classifier's own pooling (the last token that is not the pad id), so plain transformers
    and TRL's PPO score a saved reward model at the same place. Evaluation predictions are
    (n, 2) arrays of (chosen, rejected) scores; the label is the preferred column, always 0.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs, scaled for accumulation here

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        chosen, rejected = scores.squeeze(-1).float().chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        return (loss, (chosen, rejected)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, (chosen, rejected) = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), torch.stack((chosen, rejected), dim=-1), torch.zeros_like(chosen, dtype=torch.long)
